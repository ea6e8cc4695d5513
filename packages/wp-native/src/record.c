/* Snapshot records for the restorer: checking and decoding one record.
 * The CRC-32 (zlib's: ISO-HDLC, reflected, as gzip) is computed by Intel's
 * ISA-L (Debian's libisal, crc32_gzip_refl: carry-less multiply, 20x zlib's
 * braided loop here: 0.02 us against 0.5 us for a 2 KiB block, which a lazy
 * restore pays on every fault); the LZ4 block decoder is liblz4's (Debian's,
 * fuzzed and hardened). Encoding 1 (lz4, format version 1) is a `u32 length` and
 * one LZ4 block (lz4-napi's framing); encoding 3 (pages) is a table and one
 * block per page (record_encode.c writes it). */
#define _GNU_SOURCE
#include "record.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <isa-l/crc.h>
#include <lz4.h>

#define PAGE 4096u

uint32_t record_crc32(uint32_t crc, const uint8_t *p, size_t n)
{
    if (n == 0)
        return crc; /* an empty payload may come as a NULL buffer */
    return crc32_gzip_refl(crc, p, n); /* continues a running CRC as zlib's crc32 does (test_record pins it) */
}

int64_t record_lz4_decode(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap)
{
    if (src_len > LZ4_MAX_INPUT_SIZE || dst_cap > LZ4_MAX_INPUT_SIZE)
        return -1;
    int n = LZ4_decompress_safe((const char *)src, (char *)dst, (int)src_len, (int)dst_cap);
    return n < 0 ? -1 : n;
}

/* Nothing to hold since the CRC-32 and LZ4 come from zlib and liblz4; kept
 * as a handle so callers need not change if the codec gains state. */
struct wp_record_codec {
    int unused;
};

wp_record_codec *wp_record_codec_create(void)
{
    return calloc(1, sizeof(wp_record_codec));
}

int32_t wp_record_codec_destroy(wp_record_codec *c)
{
    free(c);
    return 0;
}

static int refuse(uint32_t *why_out, uint32_t why)
{
    *why_out = why;
    return -EBADMSG;
}

static int64_t check_header(const uint8_t *h, uint32_t region, uint64_t first_page, uint32_t page_count, uint32_t *why_out)
{
    uint32_t magic, h_region, count, stored;
    uint64_t first;
    memcpy(&magic, h, 4);
    memcpy(&h_region, h + 4, 4);
    memcpy(&first, h + 8, 8);
    memcpy(&count, h + 16, 4);
    memcpy(&stored, h + 24, 4);
    uint8_t encoding = h[20];
    *why_out = WP_RECORD_OK;
    if (magic != RECORD_MAGIC)
        return refuse(why_out, WP_RECORD_BAD_MAGIC);
    if (h_region != region || first != first_page || count != page_count || !count || count > RECORD_MAX_PAGES)
        return refuse(why_out, WP_RECORD_MISPLACED);
    if (encoding > RECORD_PAGES || h[21] || h[22] || h[23])
        return refuse(why_out, WP_RECORD_BAD_ENCODING);
    uint64_t bytes = (uint64_t)count * PAGE, table = (uint64_t)count * PAGES_ENTRY;
    bool fits = encoding == RECORD_RAW    ? stored == bytes
                : encoding == RECORD_ZERO ? stored == 0
                /* pages: the table, then at most a raw page per entry */
                : encoding == RECORD_PAGES ? count <= WP_RECORD_PAGES_MAX_PAGES && stored >= table && stored <= table + bytes
                                          /* lz4: a length prefix and a block that can expand to bytes (LZ4 grows at most 255x) */
                                          : stored > 4 && stored <= bytes + 1024 && bytes <= 255 * (uint64_t)(stored - 4);
    if (!fits)
        return refuse(why_out, WP_RECORD_BAD_SIZE);
    return stored;
}

int32_t wp_record_check(const uint8_t *h, uint32_t region, uint64_t first_page, uint32_t page_count, uint32_t *out)
{
    int64_t stored = check_header(h, region, first_page, page_count, &out[1]);
    out[0] = stored < 0 ? 0 : (uint32_t)stored;
    return stored < 0 ? (int32_t)stored : 0;
}

/* Encoding 3's table, n entries at t: every blockBytes at most 4096 and
 * their sum plus the table equal to stored; else BAD_SIZE. This is what
 * places every block inside the payload, so it runs before any block. */
static int pages_table_check(const uint8_t *t, uint32_t n, uint64_t stored, uint32_t *why_out)
{
    uint64_t sum = (uint64_t)n * PAGES_ENTRY;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t bytes;
        memcpy(&bytes, t + (size_t)k * PAGES_ENTRY, 4);
        if (bytes > PAGE)
            return refuse(why_out, WP_RECORD_BAD_SIZE);
        sum += bytes;
    }
    return sum == stored ? 0 : refuse(why_out, WP_RECORD_BAD_SIZE);
}

/* Decodes block k (table entry e, its bytes at block) into dst (4096
 * bytes): its CRC, then zero (dst zeroed when zero_fill, else untouched),
 * raw (block may be dst itself) or lz4 to exactly 4096 bytes. tmp, when not
 * NULL, holds an lz4 block first (4096 bytes: the block may overlap dst).
 * Returns RECORD_ZERO / RECORD_RAW / RECORD_LZ4 or -EBADMSG. */
static int pages_block_decode(const uint8_t *e, const uint8_t *block, uint8_t *dst, uint8_t *tmp, bool zero_fill,
                              uint32_t *why_out)
{
    uint32_t bytes, crc;
    memcpy(&bytes, e, 4);
    memcpy(&crc, e + 4, 4);
    if (record_crc32(0, block, bytes) != crc)
        return refuse(why_out, WP_RECORD_BAD_CHECKSUM);
    if (bytes == 0) {
        if (zero_fill)
            memset(dst, 0, PAGE);
        return RECORD_ZERO;
    }
    if (bytes == PAGE) {
        if (block != dst)
            memmove(dst, block, PAGE);
        return RECORD_RAW;
    }
    if (tmp) {
        memcpy(tmp, block, bytes);
        block = tmp;
    }
    if (record_lz4_decode(block, bytes, dst, PAGE) != PAGE)
        return refuse(why_out, WP_RECORD_BAD_PAYLOAD);
    return RECORD_LZ4;
}

/* Encoding 3, the whole record: header h + table CRC, the table, then every
 * block into out (count x 4096 bytes). blocks may lie inside out, at its
 * end (record_read reads them there): block k then starts at or after page
 * k's place once the table is checked, so decoding in page order only
 * overwrites blocks already decoded; tmp (4096 bytes) is then needed. */
static int pages_decode(const uint8_t *h, const uint8_t *table, uint64_t stored, const uint8_t *blocks, uint8_t *out,
                        uint8_t *tmp, uint32_t *why_out)
{
    uint32_t count, crc;
    memcpy(&count, h + 16, 4);
    memcpy(&crc, h + 28, 4);
    uint64_t table_bytes = (uint64_t)count * PAGES_ENTRY;
    if (count == 0 || count > WP_RECORD_PAGES_MAX_PAGES || stored < table_bytes)
        return refuse(why_out, WP_RECORD_BAD_SIZE);
    if (record_crc32(record_crc32(0, h, 28), table, table_bytes) != crc)
        return refuse(why_out, WP_RECORD_BAD_CHECKSUM);
    int rc = pages_table_check(table, count, stored, why_out);
    for (uint32_t k = 0; k < count && rc == 0; k++) {
        uint32_t bytes;
        memcpy(&bytes, table + (size_t)k * PAGES_ENTRY, 4);
        rc = pages_block_decode(table + (size_t)k * PAGES_ENTRY, blocks, out + (size_t)k * PAGE, tmp, true, why_out);
        rc = rc < 0 ? rc : 0;
        blocks += bytes;
    }
    return rc < 0 ? rc : RECORD_PAGES;
}

int32_t wp_record_decode(const wp_record_codec *codec, const uint8_t *h, const uint8_t *payload, uint64_t stored,
                         uint8_t *out, uint64_t out_bytes, uint32_t *why_out)
{
    (void)codec;
    uint32_t crc, count, h_stored;
    memcpy(&count, h + 16, 4);
    memcpy(&h_stored, h + 24, 4);
    memcpy(&crc, h + 28, 4);
    *why_out = WP_RECORD_OK;
    if (stored != h_stored)
        return refuse(why_out, WP_RECORD_BAD_SIZE);
    uint8_t encoding = h[20];
    uint64_t bytes = (uint64_t)count * PAGE;
    if (encoding == RECORD_PAGES) {
        if (out_bytes < bytes)
            return refuse(why_out, WP_RECORD_BAD_PAYLOAD);
        uint64_t table = (uint64_t)count * PAGES_ENTRY;
        return pages_decode(h, payload, stored, stored < table ? payload : payload + table, out, NULL, why_out);
    }
    if (record_crc32(record_crc32(0, h, 28), payload, stored) != crc)
        return refuse(why_out, WP_RECORD_BAD_CHECKSUM);
    if (encoding != RECORD_LZ4)
        return encoding;
    uint32_t len;
    memcpy(&len, payload, 4);
    if (len != bytes || out_bytes < bytes || record_lz4_decode(payload + 4, stored - 4, out, bytes) != (int64_t)bytes)
        return refuse(why_out, WP_RECORD_BAD_PAYLOAD);
    return RECORD_LZ4;
}

/* Encoding 3 for record_read: the table into scratch and the blocks into
 * the end of out with one preadv, then decoded in place (pages_decode). */
static int read_pages(const uint8_t *h, int file, uint64_t file_offset, uint64_t stored, uint8_t *out, uint8_t *scratch,
                      size_t scratch_cap, uint32_t *why_out)
{
    uint32_t count;
    memcpy(&count, h + 16, 4);
    size_t table = (size_t)count * PAGES_ENTRY, bytes = (size_t)count * PAGE;
    if (table + PAGE > scratch_cap)
        return -ENOBUFS;
    size_t blocks = (size_t)stored - table; /* check_header: table <= stored <= table + bytes */
    struct iovec iov[2] = {{scratch, table}, {out + bytes - blocks, blocks}};
    if (preadv(file, iov, 2, (off_t)(file_offset + RECORD_HEADER_BYTES)) != (ssize_t)stored)
        return -EIO;
    return pages_decode(h, scratch, stored, out + bytes - blocks, out, scratch + table, why_out);
}

int record_read(const wp_record_codec *c, int file, bool raw, uint64_t file_offset, uint32_t region, uint64_t first_page,
                uint32_t pages, uint8_t *out, uint8_t *scratch, size_t scratch_cap, uint32_t *why_out)
{
    size_t bytes = (size_t)pages * PAGE;
    *why_out = WP_RECORD_OK;
    if (raw) {
        ssize_t got = pread(file, out, bytes, (off_t)file_offset);
        if (got < 0)
            return -errno;
        /* Short: the image shrank since it was measured (a whole number of
         * pages, checked then): -EIO, never zeros in place of its pages. */
        return (size_t)got == bytes ? RECORD_RAW : -EIO;
    }
    uint8_t h[RECORD_HEADER_BYTES];
    if (pread(file, h, sizeof h, (off_t)file_offset) != (ssize_t)sizeof h)
        return -EIO;
    int64_t stored = check_header(h, region, first_page, pages, why_out);
    if (stored < 0)
        return (int)stored;
    if (h[20] == RECORD_PAGES)
        return read_pages(h, file, file_offset, (uint64_t)stored, out, scratch, scratch_cap, why_out);
    /* A raw payload is read straight into out; a compressed one into scratch. */
    uint8_t *payload = h[20] == RECORD_RAW ? out : scratch;
    if (h[20] == RECORD_LZ4 && (uint64_t)stored > scratch_cap)
        return refuse(why_out, WP_RECORD_BAD_SIZE);
    if (stored && pread(file, payload, (size_t)stored, (off_t)(file_offset + RECORD_HEADER_BYTES)) != (ssize_t)stored)
        return -EIO;
    int rc = wp_record_decode(c, h, payload, (uint64_t)stored, out, bytes, why_out);
    if (rc == RECORD_ZERO)
        memset(out, 0, bytes);
    return rc;
}

bool record_is_zero(int file, uint64_t file_offset, uint32_t region, uint64_t first_page, uint32_t pages)
{
    uint8_t h[RECORD_HEADER_BYTES];
    uint32_t why;
    return pread(file, h, sizeof h, (off_t)file_offset) == (ssize_t)sizeof h &&
           check_header(h, region, first_page, pages, &why) >= 0 && h[20] == RECORD_ZERO;
}

int record_read_page(const wp_record_codec *c, int file, uint64_t file_offset, uint32_t region, uint64_t first_page,
                     uint32_t pages, uint32_t k, uint8_t *out, uint8_t *scratch, size_t scratch_cap, uint32_t *why_out,
                     bool *whole_out)
{
    (void)c;
    *why_out = WP_RECORD_OK;
    *whole_out = true;
    if (k >= pages)
        return -EINVAL;
    /* The header and the table: one pread (into scratch), then one for the block. */
    size_t table = (size_t)pages * PAGES_ENTRY;
    if (RECORD_HEADER_BYTES + table + PAGE > scratch_cap)
        return -ENOBUFS;
    ssize_t got = pread(file, scratch, RECORD_HEADER_BYTES + table, (off_t)file_offset);
    if (got < (ssize_t)RECORD_HEADER_BYTES)
        return -EIO;
    const uint8_t *h = scratch, *t = scratch + RECORD_HEADER_BYTES;
    int64_t stored = check_header(h, region, first_page, pages, why_out);
    if (stored < 0)
        return (int)stored;
    if (h[20] == RECORD_ZERO)
        return RECORD_ZERO; /* a zero record: every page zero, nothing to read */
    if (h[20] != RECORD_PAGES)
        return -ENOTSUP;
    if (got != (ssize_t)(RECORD_HEADER_BYTES + table))
        return -EIO;
    uint32_t crc;
    memcpy(&crc, h + 28, 4);
    if (record_crc32(record_crc32(0, h, 28), t, table) != crc)
        return refuse(why_out, WP_RECORD_BAD_CHECKSUM);
    int rc = pages_table_check(t, pages, (uint64_t)stored, why_out);
    if (rc < 0)
        return rc;
    uint64_t at = table;
    uint32_t bytes;
    for (uint32_t j = 0; j < k; j++) {
        memcpy(&bytes, t + (size_t)j * PAGES_ENTRY, 4);
        at += bytes;
    }
    memcpy(&bytes, t + (size_t)k * PAGES_ENTRY, 4);
    /* A raw block is read straight into out; an lz4 one after the table. */
    uint8_t *block = bytes == PAGE ? out : scratch + RECORD_HEADER_BYTES + table;
    if (bytes && pread(file, block, bytes, (off_t)(file_offset + RECORD_HEADER_BYTES + at)) != (ssize_t)bytes)
        return -EIO;
    rc = pages_block_decode(t + (size_t)k * PAGES_ENTRY, block, out, NULL, false, why_out);
    if (rc < 0)
        *whole_out = false; /* the header and table were good: only page k's block is bad */
    return rc;
}
