/* Writing snapshot records (docs/format.md): encoding 3 ("pages", one block
 * and one CRC-32 per page) and zero records, a whole writer batch per call,
 * so the writer's per-batch work (cutting records, compressing, checksums)
 * is one native call (issue 14). LZ4 blocks are liblz4's, CRC-32 zlib's. */
#define _GNU_SOURCE
#include "record.h"

#include <errno.h>
#include <string.h>

#include <lz4.h>

#define PAGE 4096u

static bool page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)(const void *)p;
    for (unsigned i = 0; i < PAGE / 8; i++)
        if (w[i])
            return false;
    return true;
}

static void put_header(uint8_t *h, uint32_t region, uint64_t first_page, uint32_t pages, uint8_t encoding, uint32_t stored)
{
    uint32_t magic = RECORD_MAGIC;
    memcpy(h, &magic, 4);
    memcpy(h + 4, &region, 4);
    memcpy(h + 8, &first_page, 8);
    memcpy(h + 16, &pages, 4);
    h[20] = encoding;
    h[21] = h[22] = h[23] = 0;
    memcpy(h + 24, &stored, 4);
}

int64_t wp_record_encode_pages(uint32_t region, uint64_t first_page, uint32_t pages, const uint8_t *data, uint32_t options,
                               uint8_t *out, uint64_t out_cap)
{
    if (pages == 0 || pages > WP_RECORD_PAGES_MAX_PAGES || (options & ~WP_RECORD_ENCODE_LZ4))
        return -EINVAL;
    if (out_cap < WP_RECORD_PAGES_BOUND(pages))
        return -ENOBUFS;
    bool lz4 = options & WP_RECORD_ENCODE_LZ4;
    uint8_t *table = out + RECORD_HEADER_BYTES;
    uint8_t *block = table + (size_t)pages * PAGES_ENTRY;
    for (uint32_t k = 0; k < pages; k++) {
        const uint8_t *page = data + (size_t)k * PAGE;
        uint32_t bytes = 0;
        if (!page_is_zero(page)) {
            /* 0 when the block would not be under 4096 bytes: stored raw */
            int n = lz4 ? LZ4_compress_default((const char *)page, (char *)block, (int)PAGE, (int)PAGE - 1) : 0;
            bytes = n > 0 ? (uint32_t)n : PAGE;
            if (n <= 0)
                memcpy(block, page, PAGE);
        }
        uint32_t crc = record_crc32(0, block, bytes);
        memcpy(table + (size_t)k * PAGES_ENTRY, &bytes, 4);
        memcpy(table + (size_t)k * PAGES_ENTRY + 4, &crc, 4);
        block += bytes;
    }
    uint64_t stored = (uint64_t)(block - table);
    put_header(out, region, first_page, pages, RECORD_PAGES, (uint32_t)stored);
    uint32_t crc = record_crc32(record_crc32(0, out, 28), table, (size_t)pages * PAGES_ENTRY);
    memcpy(out + 28, &crc, 4);
    return (int64_t)(RECORD_HEADER_BYTES + stored);
}

static void describe(uint32_t *d, uint32_t region, uint64_t first_page, uint32_t pages, uint32_t encoding, uint64_t bytes)
{
    d[0] = region;
    d[1] = (uint32_t)first_page;
    d[2] = (uint32_t)(first_page >> 32);
    d[3] = pages;
    d[4] = encoding;
    d[5] = (uint32_t)bytes;
}

int32_t wp_record_encode_batch(const uint32_t *regions, const uint64_t *pages, const uint8_t *flags, uint32_t n,
                               const uint8_t *data, uint32_t max_pages, uint32_t options, uint8_t *out, uint64_t out_cap,
                               uint32_t *records_out, uint32_t records_cap)
{
    if (max_pages == 0 || max_pages > WP_RECORD_PAGES_MAX_PAGES || (options & ~WP_RECORD_ENCODE_LZ4))
        return -EINVAL;
    if (out_cap < WP_RECORD_BATCH_BOUND(n))
        return -ENOBUFS;
    uint64_t at = 0;
    uint32_t records = 0;
    const uint8_t *packed = data;
    for (uint32_t i = 0; i < n;) {
        bool zero = flags[i] == 1; /* WP_PAGE_ZERO */
        uint32_t j = i + 1;
        while (j < n && regions[j] == regions[i] && pages[j] == pages[i] + (j - i) && (flags[j] == 1) == zero &&
               j - i < (zero ? WP_RECORD_MAX_PAGES : max_pages))
            j++;
        if (records == records_cap)
            return -ENOBUFS;
        uint32_t *d = records_out + (size_t)records * WP_RECORD_BATCH_FIELDS;
        if (zero) {
            /* Header only: the CRC covers its 28 bytes. */
            put_header(out + at, regions[i], pages[i], j - i, RECORD_ZERO, 0);
            uint32_t crc = record_crc32(0, out + at, 28);
            memcpy(out + at + 28, &crc, 4);
            describe(d, regions[i], pages[i], j - i, RECORD_ZERO, RECORD_HEADER_BYTES);
            at += RECORD_HEADER_BYTES;
        } else {
            int64_t bytes = wp_record_encode_pages(regions[i], pages[i], j - i, packed, options, out + at, out_cap - at);
            if (bytes < 0)
                return (int32_t)bytes;
            describe(d, regions[i], pages[i], j - i, RECORD_PAGES, (uint64_t)bytes);
            at += (uint64_t)bytes;
            packed += (size_t)(j - i) * PAGE;
        }
        records++;
        i = j;
    }
    return (int32_t)records;
}
