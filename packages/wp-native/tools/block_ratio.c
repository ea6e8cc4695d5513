/*
 * block_ratio: how well a memory image compresses with LZ4 per 4 KiB page
 * (record encoding 3: one block per page) against per 64 KiB run (format
 * version 1's 16-page lz4 records), on the same bytes. docs/format.md quotes
 * it on the demo guest's memory:
 *
 *   make -C packages/wp-native build/block_ratio
 *   packages/wp-native/build/block_ratio IMAGE   (a raw image: vmsnap restore FILE --raw IMAGE)
 *
 * All-zero pages are left out of both (zero records or blockBytes 0 hold
 * them in both formats). Per 4 KiB: LZ4_compress_default of the page, raw
 * (4096) when that is not smaller, plus the 8-byte table entry; per 64 KiB:
 * runs of consecutive data pages cut every 16 pages, as format 1's writer
 * cut them, each LZ4_compress_default'ed whole, raw when not smaller, plus
 * the 4-byte length prefix. Record headers (32 bytes each) are left out of
 * both. Prints one JSON line: data bytes, stored bytes of each, and
 * data/stored ratios.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>

#define PAGE 4096
#define RUN (16 * PAGE)

static bool zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

/* One run of up to 16 data pages, compressed whole: its stored bytes (format 1's lz4 record payload). */
static uint64_t run_stored(const uint8_t *run, size_t pages, uint8_t *out)
{
    int bytes = (int)(pages * PAGE);
    int n = LZ4_compress_default((const char *)run, (char *)out, bytes, bytes - 1);
    return 4 + (uint64_t)(n > 0 ? n : bytes);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: block_ratio RAW_IMAGE\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    static uint8_t run[RUN], out[LZ4_COMPRESSBOUND(RUN)];
    uint64_t data_pages = 0, per_page = 0, per_run = 0;
    size_t in_run = 0;
    while (fread(run + in_run * PAGE, 1, PAGE, f) == PAGE) {
        const uint8_t *p = run + in_run * PAGE;
        if (zero(p, PAGE)) {
            if (in_run)
                per_run += run_stored(run, in_run, out);
            in_run = 0;
            continue;
        }
        data_pages++;
        int n = LZ4_compress_default((const char *)p, (char *)out, PAGE, PAGE - 1);
        per_page += 8 + (uint64_t)(n > 0 ? n : PAGE);
        if (++in_run == 16) {
            per_run += run_stored(run, in_run, out);
            in_run = 0;
        }
    }
    if (in_run)
        per_run += run_stored(run, in_run, out);
    fclose(f);
    uint64_t bytes = data_pages * PAGE;
    printf("{\"dataPages\":%llu,\"dataBytes\":%llu,\"perPageStored\":%llu,\"perRunStored\":%llu,\"perPageRatio\":%.4f,\"perRunRatio\":%.4f}\n",
           (unsigned long long)data_pages, (unsigned long long)bytes, (unsigned long long)per_page, (unsigned long long)per_run,
           per_page ? (double)bytes / (double)per_page : 0.0, per_run ? (double)bytes / (double)per_run : 0.0);
    return 0;
}
