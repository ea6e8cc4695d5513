/* Internal: reading one snapshot record (docs/format.md) — its header,
 * CRC-32 and LZ4 payload, or one page of an encoding-3 record — for the
 * restorer. */
#ifndef VMSNAP_WP_RECORD_H
#define VMSNAP_WP_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vmsnap_record.h"

#define RECORD_HEADER_BYTES WP_RECORD_HEADER_BYTES
#define RECORD_MAGIC 0x31444352u /* "RCD1" */
#define RECORD_MAX_PAGES WP_RECORD_MAX_PAGES

enum { RECORD_RAW = WP_RECORD_RAW, RECORD_LZ4 = WP_RECORD_LZ4, RECORD_ZERO = WP_RECORD_ZERO, RECORD_PAGES = WP_RECORD_PAGES };
#define PAGES_ENTRY WP_RECORD_PAGES_ENTRY_BYTES

/* CRC-32 (zlib's) of p, continuing from crc (0 to start). */
uint32_t record_crc32(uint32_t crc, const uint8_t *p, size_t n);

/* Decodes one LZ4 block (liblz4) into dst; the bytes produced, or -1 if
 * malformed or bigger than dst_cap. */
int64_t record_lz4_decode(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);

/* Reads the record at file_offset, which the index says holds `pages`
 * pages of `region` from first_page, into out (pages * 4096 bytes; zero
 * records are zeroed), with the rules of wp_record_check/wp_record_decode
 * (the one decoder). scratch holds a compressed payload (scratch_cap bytes:
 * pages * 4096 + 1024 is always enough; encoding 3 needs 8 * pages + 4096:
 * its table, and one block while its blocks are decoded in place at the end
 * of out). With raw, the file is a raw image and the "record" is just the
 * bytes at file_offset. Returns the RECORD_* encoding (RECORD_PAGES: out
 * fully written) or -errno (-EBADMSG: corrupt, why in *why_out; -EIO:
 * short; -ENOBUFS: scratch_cap too small). */
int record_read(const wp_record_codec *c, int file, bool raw, uint64_t file_offset, uint32_t region, uint64_t first_page,
                uint32_t pages, uint8_t *out, uint8_t *scratch, size_t scratch_cap, uint32_t *why_out);

/* Whether the record at file_offset is a zero record whose header agrees
 * with its index entry (one 32-byte pread): its pages are installed as zero
 * pages with no buffer, whatever its size (up to 2^20 pages). False for
 * any other record, or one that does not check (record_read says why). */
bool record_is_zero(int file, uint64_t file_offset, uint32_t region, uint64_t first_page, uint32_t pages);

/* Reads page k (0-based) of the record at file_offset (index entry region/first_page/pages) into out (4096
 * bytes): header checked against the entry, header+table CRC, page k's block CRC, decode. Reads only the
 * header, the table and page k's block (two preads, never the whole record; a raw block straight
 * into out). scratch: at least 32 + 8*pages + 4096 bytes (the header and table, then a block). Returns RECORD_ZERO (page all zero, or a zero record, whose
 * header is checked: out not written), RECORD_RAW or RECORD_LZ4 (out filled), -ENOTSUP if the record is raw or
 * lz4 whole (encodings 0 and 1: the caller reads the whole record with record_read), -EBADMSG (why in *why_out; only this page or the whole record? : *whole_out = true when the
 * header/table is bad, false when only page k's block is), -EIO (short read), -EINVAL (k >= pages),
 * -ENOBUFS (scratch_cap too small). On -EBADMSG out may have been written. */
int record_read_page(const wp_record_codec *c, int file, uint64_t file_offset, uint32_t region, uint64_t first_page,
                     uint32_t pages, uint32_t k, uint8_t *out, uint8_t *scratch, size_t scratch_cap, uint32_t *why_out,
                     bool *whole_out);

/* A writer batch encoded for one pwritev (writer.c): the records' bytes in
 * file order as iovecs into meta, blocks and the batch's own data. For a
 * batch of n entries: meta at least n * (32 + 8) bytes (headers and
 * tables), blocks n * 4096 (lz4 only; raw blocks stay in data, not
 * copied), iov 2 * n entries, fields n * WP_RECORD_BATCH_FIELDS. */
struct record_iov {
    uint8_t *meta;
    uint8_t *blocks;
    struct iovec *iov;
    uint32_t *fields; /* per record, as wp_record_encode_batch's records_out */
    uint32_t count;   /* iovecs used */
    uint32_t records;
    uint64_t bytes;   /* all records' bytes */
};

/* wp_record_encode_batch's records, described by out instead of copied
 * into one buffer. Returns the record count or -EINVAL (max_pages). */
int32_t record_encode_iov(const uint32_t *regions, const uint64_t *pages, const uint8_t *flags, uint32_t n,
                          const uint8_t *data, uint32_t max_pages, bool lz4, struct record_iov *out);

#endif
