/* Opening and probing userfaultfd. */
#define _GNU_SOURCE
#include "uffd.h"
#include "vmsnap_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int uffd_open_fd(int flags, int32_t *how)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0) {
        *how = WP_OPEN_SYSCALL;
        return fd;
    }
    int sys_err = errno;
    if (sys_err == ENOSYS)
        return -ENOSYS;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -sys_err; /* report the syscall's reason: it names the sysctl case */
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int dev_err = errno;
    close(dev);
    if (fd < 0)
        return -dev_err;
    *how = WP_OPEN_DEVICE;
    return fd;
}

int uffd_handshake(int fd, uint64_t want, uint64_t *offered)
{
    struct uffdio_api api = {.api = UFFD_API, .features = want};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *offered = api.features;
    return 0;
}

int32_t wp_abi_version(void)
{
    return WP_ABI_VERSION;
}

int32_t wp_probe(uint64_t *features_out, int32_t *open_path_out)
{
    int32_t how = 0;
    int fd = uffd_open_fd(O_CLOEXEC | O_NONBLOCK, &how);
    if (fd < 0)
        return fd;
    /* Asking for no feature returns everything the kernel offers. */
    uint64_t offered = 0;
    int rc = uffd_handshake(fd, 0, &offered);
    close(fd);
    if (rc < 0)
        return rc;
    *features_out = offered;
    *open_path_out = how;
    return 0;
}
