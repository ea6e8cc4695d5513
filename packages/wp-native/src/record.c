/* Snapshot records for the restorer: checking and decoding one record.
 * CRC-32 is zlib's and the LZ4 block decoder is liblz4's (Debian's, fuzzed
 * and hardened); lz4-napi writes a `u32 length` and one LZ4 block. */
#define _GNU_SOURCE
#include "record.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lz4.h>
#include <zlib.h>

#define PAGE 4096u

uint32_t record_crc32(uint32_t crc, const uint8_t *p, size_t n)
{
    if (n == 0)
        return crc; /* zlib answers 0 for a NULL buffer, as an empty payload may be */
    return (uint32_t)crc32_z(crc, p, n);
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
    if (encoding > RECORD_ZERO || h[21] || h[22] || h[23])
        return refuse(why_out, WP_RECORD_BAD_ENCODING);
    uint64_t bytes = (uint64_t)count * PAGE;
    bool fits = encoding == RECORD_RAW    ? stored == bytes
                : encoding == RECORD_ZERO ? stored == 0
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
    if (record_crc32(record_crc32(0, h, 28), payload, stored) != crc)
        return refuse(why_out, WP_RECORD_BAD_CHECKSUM);
    uint8_t encoding = h[20];
    if (encoding != RECORD_LZ4)
        return encoding;
    uint64_t bytes = (uint64_t)count * PAGE;
    uint32_t len;
    memcpy(&len, payload, 4);
    if (len != bytes || out_bytes < bytes || record_lz4_decode(payload + 4, stored - 4, out, bytes) != (int64_t)bytes)
        return refuse(why_out, WP_RECORD_BAD_PAYLOAD);
    return RECORD_LZ4;
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
        if ((size_t)got < bytes)
            memset(out + got, 0, bytes - (size_t)got);
        return RECORD_RAW;
    }
    uint8_t h[RECORD_HEADER_BYTES];
    if (pread(file, h, sizeof h, (off_t)file_offset) != (ssize_t)sizeof h)
        return -EIO;
    int64_t stored = check_header(h, region, first_page, pages, why_out);
    if (stored < 0)
        return (int)stored;
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
