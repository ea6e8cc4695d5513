/*
 * The file behind a region of shared memory (a memfd, shmem, hugetlbfs),
 * found from a mapping in this process or, with no mapping here (a process
 * snapshot), in the process that maps it. Shared memory is read with pread
 * from that file, never through a mapping: a file that shrank (a hostile or
 * buggy peer) gives a short read, not a SIGBUS that would kill the whole
 * process, and reading a hole does not allocate it. Holes are found with
 * SEEK_DATA / SEEK_HOLE: never populated, so zero, and not to be read.
 */
#define _GNU_SOURCE
#include "engine_internal.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

/* One line of /proc/self/maps: [start, end) at file offset, shared or not. */
struct vma_line {
    uint64_t start, end, offset, inode;
    bool shared;
};

static bool parse_vma(const char *line, struct vma_line *v)
{
    char perms[8];
    unsigned major, minor;
    if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64, &v->start, &v->end, perms, &v->offset,
               &major, &minor, &v->inode) != 7)
        return false;
    v->shared = perms[3] == 's';
    return true;
}

int wp_backing_open(int32_t pid, uint64_t hva, uint64_t size, int *fd_out, uint64_t *offset_out)
{
    char path[64];
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/maps", pid);
    else
        snprintf(path, sizeof path, "/proc/self/maps");
    FILE *maps = fopen(path, "re");
    if (!maps)
        return -errno;
    char line[512];
    struct vma_line first = {0}, v;
    uint64_t covered = hva; /* the region is covered up to here */
    bool found = false;
    while (covered < hva + size && fgets(line, sizeof line, maps)) {
        if (!parse_vma(line, &v) || v.end <= covered)
            continue;
        if (v.start > covered || !v.shared || v.inode == 0)
            break; /* a gap, a private or an anonymous mapping */
        if (!found) {
            first = v;
            found = true;
        } else if (v.inode != first.inode || v.offset - first.offset != v.start - first.start) {
            break; /* another file, or not contiguous in it */
        }
        covered = v.end;
    }
    fclose(maps);
    if (!found || covered < hva + size)
        return -ENOENT;
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/map_files/%" PRIx64 "-%" PRIx64, pid, first.start, first.end);
    else
        snprintf(path, sizeof path, "/proc/self/map_files/%" PRIx64 "-%" PRIx64, first.start, first.end);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno; /* map_files needs CAP_SYS_ADMIN */
    *fd_out = fd;
    *offset_out = first.offset + (hva - first.start);
    return 0;
}

int wp_backing_read(int fd, uint64_t offset, uint8_t *dst, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, dst + done, len - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO; /* the file ends before the region does: it shrank */
        done += (size_t)n;
    }
    return 0;
}

int wp_backing_data_map(int fd, uint64_t offset, uint64_t pages, uint8_t *map)
{
    memset(map, 0, pages);
    uint64_t end = offset + pages * WP_PAGE_SIZE, file_size;
    int rc = wp_backing_size(fd, &file_size);
    if (rc < 0)
        return rc;
    if (file_size < end)
        return -EIO; /* it shrank: past its end is not a hole */
    for (uint64_t at = offset; at < end;) {
        off_t data = lseek(fd, (off_t)at, SEEK_DATA);
        if (data < 0)
            return errno == ENXIO ? 0 : -errno; /* ENXIO: only a hole up to the end of the file */
        if ((uint64_t)data >= end)
            return 0;
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            return -errno;
        uint64_t from = ((uint64_t)data - offset) / WP_PAGE_SIZE;
        uint64_t to = ((uint64_t)hole < end ? (uint64_t)hole - offset + WP_PAGE_SIZE - 1 : end - offset) / WP_PAGE_SIZE;
        memset(map + from, 1, to - from);
        at = (uint64_t)hole;
    }
    return 0;
}

int wp_backing_has_data(int fd, uint64_t offset)
{
    /* SEEK_DATA only: it stops at the first data, where SEEK_HOLE would scan
     * on to the end of it. */
    off_t data = lseek(fd, (off_t)offset, SEEK_DATA);
    if (data < 0)
        return errno == ENXIO ? 0 : -errno;
    return (uint64_t)data < offset + WP_PAGE_SIZE;
}

int wp_backing_watch(int watch, int fd)
{
    /* The magic link names the file itself (a memfd has no other path). */
    char path[48];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return inotify_add_watch(watch, path, IN_MODIFY) < 0 ? -errno : 0;
}

bool wp_backing_changed(int watch)
{
    /* Events are at least 16 bytes: a full buffer may leave more to drain. */
    _Alignas(struct inotify_event) char buf[4096];
    bool any = false;
    while (read(watch, buf, sizeof buf) > 0)
        any = true;
    return any;
}

int wp_backing_size(int fd, uint64_t *size_out)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    *size_out = (uint64_t)st.st_size;
    return 0;
}

/* The page size the kernel maps [hva] with in process pid (KernelPageSize
 * in /proc/PID/smaps): 4096, or a hugetlbfs page size. */
int wp_kernel_page_size(int32_t pid, uint64_t hva, uint64_t *size_out)
{
    char path[48];
    snprintf(path, sizeof path, "/proc/%d/smaps", pid);
    FILE *smaps = fopen(path, "re");
    if (!smaps)
        return -errno;
    char line[512];
    bool inside = false;
    int rc = -ENOENT; /* nothing mapped at hva */
    while (rc == -ENOENT && fgets(line, sizeof line, smaps)) {
        struct vma_line v;
        unsigned long kib;
        if (isxdigit((unsigned char)line[0]) && parse_vma(line, &v))
            inside = hva >= v.start && hva < v.end; /* a mapping's first line */
        else if (inside && sscanf(line, "KernelPageSize: %lu kB", &kib) == 1) {
            *size_out = (uint64_t)kib * 1024;
            rc = 0;
        }
    }
    fclose(smaps);
    return rc;
}

bool wp_private_anonymous(int32_t pid, uint64_t hva)
{
    char path[48];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "re");
    if (!maps)
        return false;
    char line[512];
    struct vma_line v;
    bool anonymous = false;
    while (fgets(line, sizeof line, maps))
        if (parse_vma(line, &v) && hva >= v.start && hva < v.end) {
            anonymous = !v.shared && v.inode == 0;
            break;
        }
    fclose(maps);
    return anonymous;
}
