/* Snapshot records for the restorer: CRC-32, an LZ4 block decoder of our own
 * (lz4-napi writes `u32 length` + one block), and reading one record. */
#define _GNU_SOURCE
#include "record.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096u

void record_codec_init(struct record_codec *c)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t v = i;
        for (int k = 0; k < 8; k++)
            v = v & 1 ? 0xEDB88320u ^ (v >> 1) : v >> 1;
        c->crc[0][i] = v;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            c->crc[t][i] = (c->crc[t - 1][i] >> 8) ^ c->crc[0][c->crc[t - 1][i] & 0xff];
}

/* CRC-32 (zlib's), eight bytes per step. */
uint32_t record_crc32(const struct record_codec *c, uint32_t crc, const uint8_t *p, size_t n)
{
    const uint32_t(*t)[256] = c->crc;
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^ t[3][hi & 0xff] ^
              t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* A length of 15 continues in the next bytes, each added, until one is not 255. */
static int lz4_extend(const uint8_t **ip, const uint8_t *iend, size_t *len)
{
    unsigned b;
    do {
        if (*ip >= iend)
            return -1;
        b = *(*ip)++;
        *len += b;
    } while (b == 255);
    return 0;
}

/* An LZ4 block is a run of sequences: literals, then a match (offset, length). */
int64_t lz4_block_decode(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap)
{
    const uint8_t *ip = src, *iend = src + src_len;
    uint8_t *op = dst, *oend = dst + dst_cap;
    while (ip < iend) {
        unsigned token = *ip++;
        size_t lit = token >> 4;
        if (lit == 15 && lz4_extend(&ip, iend, &lit) < 0)
            return -1;
        if ((size_t)(iend - ip) < lit || (size_t)(oend - op) < lit)
            return -1;
        memcpy(op, ip, lit);
        ip += lit;
        op += lit;
        if (ip >= iend)
            break; /* the last sequence has literals only */
        if (iend - ip < 2)
            return -1;
        size_t offset = (size_t)ip[0] | ((size_t)ip[1] << 8);
        ip += 2;
        if (offset == 0 || offset > (size_t)(op - dst))
            return -1;
        size_t len = token & 15;
        if (len == 15 && lz4_extend(&ip, iend, &len) < 0)
            return -1;
        len += 4;
        if ((size_t)(oend - op) < len)
            return -1;
        const uint8_t *match = op - offset;
        if (offset >= 8) {
            /* 8 bytes at a time: the source stays at least 8 bytes behind. */
            while (len >= 8) {
                memcpy(op, match, 8);
                op += 8, match += 8, len -= 8;
            }
        }
        while (len--) /* byte by byte: short offsets overlap their own output */
            *op++ = *match++;
    }
    return op - dst;
}

struct wp_record_codec {
    struct record_codec c;
};

wp_record_codec *wp_record_codec_create(void)
{
    wp_record_codec *c = malloc(sizeof *c);
    if (c)
        record_codec_init(&c->c);
    return c;
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
    const struct record_codec *c = &codec->c;
    uint32_t crc, count, h_stored;
    memcpy(&count, h + 16, 4);
    memcpy(&h_stored, h + 24, 4);
    memcpy(&crc, h + 28, 4);
    *why_out = WP_RECORD_OK;
    if (stored != h_stored)
        return refuse(why_out, WP_RECORD_BAD_SIZE);
    if (record_crc32(c, record_crc32(c, 0, h, 28), payload, stored) != crc)
        return refuse(why_out, WP_RECORD_BAD_CHECKSUM);
    uint8_t encoding = h[20];
    if (encoding != RECORD_LZ4)
        return encoding;
    uint64_t bytes = (uint64_t)count * PAGE;
    uint32_t len;
    memcpy(&len, payload, 4);
    if (len != bytes || out_bytes < bytes || lz4_block_decode(payload + 4, stored - 4, out, bytes) != (int64_t)bytes)
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
