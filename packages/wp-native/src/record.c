/* Snapshot records for the restorer: CRC-32, an LZ4 block decoder of our own
 * (lz4-napi writes `u32 length` + one block), and reading one record. */
#define _GNU_SOURCE
#include "record.h"

#include <errno.h>
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

int record_read(const struct record_codec *c, int file, bool raw, uint64_t file_offset, uint64_t first_page,
                uint32_t pages, uint8_t *out, uint8_t *scratch, size_t scratch_cap)
{
    size_t bytes = (size_t)pages * PAGE;
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
    uint32_t magic, count, stored, crc;
    uint64_t first;
    memcpy(&magic, h, 4);
    memcpy(&first, h + 8, 8);
    memcpy(&count, h + 16, 4);
    memcpy(&stored, h + 24, 4);
    memcpy(&crc, h + 28, 4);
    uint8_t encoding = h[20];
    if (magic != RECORD_MAGIC || first != first_page || count != pages)
        return -EBADMSG;
    /* A raw payload is read straight into out; a compressed one into scratch. */
    uint8_t *payload = encoding == RECORD_RAW ? out : scratch;
    size_t cap = encoding == RECORD_RAW ? bytes : scratch_cap;
    if (stored > cap || (encoding == RECORD_RAW && stored != bytes) || (encoding == RECORD_ZERO && stored != 0))
        return -EBADMSG;
    if (stored && pread(file, payload, stored, (off_t)(file_offset + RECORD_HEADER_BYTES)) != (ssize_t)stored)
        return -EIO;
    if (record_crc32(c, record_crc32(c, 0, h, 28), payload, stored) != crc)
        return -EBADMSG;
    if (encoding == RECORD_ZERO) {
        memset(out, 0, bytes);
    } else if (encoding == RECORD_LZ4) {
        uint32_t len;
        if (stored < 4 || (memcpy(&len, scratch, 4), len != bytes) ||
            lz4_block_decode(scratch + 4, stored - 4, out, bytes) != (int64_t)bytes)
            return -EBADMSG;
    } else if (encoding != RECORD_RAW) {
        return -EBADMSG;
    }
    return encoding;
}
