/* Writing snapshot records (docs/format.md): encoding 3 ("pages", one block
 * and one CRC-32 per page) and zero records, a whole writer batch per call:
 * into one buffer (wp_record_encode_batch), or as iovecs for the native
 * writer's pwritev (record_encode_iov: raw blocks are not copied). LZ4
 * blocks are liblz4's; the CRC-32 is zlib's, computed by ISA-L (record.c). */
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

/* Where an encoding-3 record's blocks go. Contiguous (blocks_at set): each
 * block is written at *blocks_at, which advances. In place (blocks_at NULL,
 * raw only): the blocks are the pages themselves, left in data. Either
 * way, with iov set, every block is added to it. */
struct blocks_out {
    uint8_t **blocks_at;
    struct record_iov *iov;
};

/* Adds [p, p + n) to v, merged with its last entry when adjacent. */
static void iov_add(struct record_iov *v, const uint8_t *p, size_t n)
{
    if (n == 0)
        return;
    if (v->count > 0) {
        struct iovec *last = &v->iov[v->count - 1];
        if ((const uint8_t *)last->iov_base + last->iov_len == p) {
            last->iov_len += n;
            return;
        }
    }
    v->iov[v->count++] = (struct iovec){.iov_base = (void *)p, .iov_len = n};
}

/* One encoding-3 record of `pages` data pages: header and table into head
 * (32 + 8 * pages bytes), blocks as `to` says (lz4: a page's block is lz4
 * where that is smaller, always written contiguously). Returns the stored
 * bytes (table and blocks). */
static uint64_t encode_pages(uint32_t region, uint64_t first_page, uint32_t pages, const uint8_t *data, bool lz4,
                             uint8_t *head, struct blocks_out to)
{
    uint8_t *table = head + RECORD_HEADER_BYTES;
    uint64_t stored = (uint64_t)pages * PAGES_ENTRY;
    for (uint32_t k = 0; k < pages; k++) {
        const uint8_t *page = data + (size_t)k * PAGE;
        const uint8_t *block = page;
        uint32_t bytes = 0;
        if (!page_is_zero(page)) {
            bytes = PAGE;
            if (to.blocks_at) {
                uint8_t *at = *to.blocks_at;
                /* 0 when the block would not be under 4096 bytes: stored raw */
                int n = lz4 ? LZ4_compress_default((const char *)page, (char *)at, (int)PAGE, (int)PAGE - 1) : 0;
                if (n > 0)
                    bytes = (uint32_t)n;
                else
                    memcpy(at, page, PAGE);
                block = at;
                *to.blocks_at = at + bytes;
            }
        }
        uint32_t crc = record_crc32(0, block, bytes);
        memcpy(table + (size_t)k * PAGES_ENTRY, &bytes, 4);
        memcpy(table + (size_t)k * PAGES_ENTRY + 4, &crc, 4);
        if (to.iov)
            iov_add(to.iov, block, bytes);
        stored += bytes;
    }
    put_header(head, region, first_page, pages, RECORD_PAGES, (uint32_t)stored);
    uint32_t crc = record_crc32(record_crc32(0, head, 28), table, (size_t)pages * PAGES_ENTRY);
    memcpy(head + 28, &crc, 4);
    return stored;
}

int64_t wp_record_encode_pages(uint32_t region, uint64_t first_page, uint32_t pages, const uint8_t *data, uint32_t options,
                               uint8_t *out, uint64_t out_cap)
{
    if (pages == 0 || pages > WP_RECORD_PAGES_MAX_PAGES || (options & ~WP_RECORD_ENCODE_LZ4))
        return -EINVAL;
    if (out_cap < WP_RECORD_PAGES_BOUND(pages))
        return -ENOBUFS;
    uint8_t *blocks = out + RECORD_HEADER_BYTES + (size_t)pages * PAGES_ENTRY;
    uint64_t stored = encode_pages(region, first_page, pages, data, options & WP_RECORD_ENCODE_LZ4, out,
                                   (struct blocks_out){.blocks_at = &blocks});
    return (int64_t)(RECORD_HEADER_BYTES + stored);
}

/* The end of the run of entries starting at i that makes one record: same
 * region, consecutive pages, all zero or all data, at most max_pages data
 * pages (WP_RECORD_MAX_PAGES zero pages). */
static uint32_t run_end(const uint32_t *regions, const uint64_t *pages, const uint8_t *flags, uint32_t n, uint32_t i,
                        uint32_t max_pages)
{
    bool zero = flags[i] == 1; /* WP_PAGE_ZERO */
    uint32_t j = i + 1;
    while (j < n && regions[j] == regions[i] && pages[j] == pages[i] + (j - i) && (flags[j] == 1) == zero &&
           j - i < (zero ? WP_RECORD_MAX_PAGES : max_pages))
        j++;
    return j;
}

/* A zero record's header (its CRC covers its 28 bytes) into h. */
static void encode_zero(uint8_t *h, uint32_t region, uint64_t first_page, uint32_t pages)
{
    put_header(h, region, first_page, pages, RECORD_ZERO, 0);
    uint32_t crc = record_crc32(0, h, 28);
    memcpy(h + 28, &crc, 4);
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
        uint32_t j = run_end(regions, pages, flags, n, i, max_pages);
        if (records == records_cap)
            return -ENOBUFS;
        uint32_t *d = records_out + (size_t)records * WP_RECORD_BATCH_FIELDS;
        if (zero) {
            encode_zero(out + at, regions[i], pages[i], j - i);
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

int32_t record_encode_iov(const uint32_t *regions, const uint64_t *pages, const uint8_t *flags, uint32_t n,
                          const uint8_t *data, uint32_t max_pages, bool lz4, struct record_iov *out)
{
    if (max_pages == 0 || max_pages > WP_RECORD_PAGES_MAX_PAGES)
        return -EINVAL;
    out->count = 0;
    out->records = 0;
    out->bytes = 0;
    uint8_t *head = out->meta;
    uint8_t *blocks = out->blocks;
    const uint8_t *packed = data;
    for (uint32_t i = 0; i < n;) {
        uint32_t j = run_end(regions, pages, flags, n, i, max_pages);
        uint32_t *d = out->fields + (size_t)out->records * WP_RECORD_BATCH_FIELDS;
        uint64_t bytes = RECORD_HEADER_BYTES;
        if (flags[i] == 1) {
            encode_zero(head, regions[i], pages[i], j - i);
            iov_add(out, head, RECORD_HEADER_BYTES);
            describe(d, regions[i], pages[i], j - i, RECORD_ZERO, bytes);
            head += RECORD_HEADER_BYTES;
        } else {
            /* the header and table first, then the blocks encode_pages adds */
            size_t meta = RECORD_HEADER_BYTES + (size_t)(j - i) * PAGES_ENTRY;
            iov_add(out, head, meta);
            bytes += encode_pages(regions[i], pages[i], j - i, packed, lz4, head,
                                  (struct blocks_out){.blocks_at = lz4 ? &blocks : NULL, .iov = out});
            describe(d, regions[i], pages[i], j - i, RECORD_PAGES, bytes);
            head += meta;
            packed += (size_t)(j - i) * PAGE;
        }
        out->bytes += bytes;
        out->records++;
        i = j;
    }
    return (int32_t)out->records;
}
