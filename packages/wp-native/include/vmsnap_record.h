/*
 * vmsnap_record.h - the one decoder of snapshot records (docs/format.md,
 * "Record"). `vmsnap verify`/`restore` (TypeScript, through ffi) and the lazy
 * restorer (restore.c) both use it, so they accept and refuse the same bytes.
 *
 * A record is a 32-byte header and a payload. wp_record_check reads the
 * header and says how many payload bytes follow (so a caller never allocates
 * more than the record's own bounds allow); wp_record_decode checks the
 * checksum and decodes the payload. Both return -EBADMSG for a record that
 * is not valid and say why (a WP_RECORD_* reason).
 */
#ifndef VMSNAP_RECORD_H
#define VMSNAP_RECORD_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#pragma GCC visibility push(default)

#define WP_RECORD_HEADER_BYTES 32u
#define WP_RECORD_MAX_PAGES (1u << 20)

/* Encodings (header byte 20). */
#define WP_RECORD_RAW 0
#define WP_RECORD_LZ4 1
#define WP_RECORD_ZERO 2
/* "pages": a table of pageCount entries { blockBytes u32 | blockCrc u32 },
 * then each page's block (0 bytes: all zero; 4096: raw; 1..4095: an LZ4
 * block of exactly 4096 bytes); the header CRC covers header and table, each
 * block its own CRC (docs/format.md, "Encoding 3"). */
#define WP_RECORD_PAGES 3
#define WP_RECORD_PAGES_MAX_PAGES 256u
#define WP_RECORD_PAGES_ENTRY_BYTES 8u

/* Why a record was refused (*why_out). */
#define WP_RECORD_OK 0
#define WP_RECORD_BAD_MAGIC 1     /* no "RCD1": corrupt or misaligned */
#define WP_RECORD_MISPLACED 2     /* region, first page or page count differ from the index */
#define WP_RECORD_BAD_ENCODING 3  /* unknown encoding byte, or reserved bytes not zero */
#define WP_RECORD_BAD_SIZE 4      /* stored bytes impossible for the encoding and page count */
#define WP_RECORD_BAD_CHECKSUM 5  /* CRC-32 of header and payload differs */
#define WP_RECORD_BAD_PAYLOAD 6   /* lz4: length prefix is not pageCount x 4096, or a block is malformed
                                     (pages: an lz4 block does not decode to exactly 4096 bytes) */

/* CRC-32 tables (8 KiB); create once, share between threads (read-only). */
typedef struct wp_record_codec wp_record_codec;
wp_record_codec *wp_record_codec_create(void);
int32_t wp_record_codec_destroy(wp_record_codec *c);

/* Checks the 32-byte header h against the index entry (region, first_page,
 * page_count; 1 to WP_RECORD_MAX_PAGES pages). Returns 0 and the payload's
 * stored bytes in out[0], or -EBADMSG and why in out[1]. For lz4 the stored
 * bytes must be at least what page_count x 4096 bytes can compress to (an
 * LZ4 block expands at most 255 times). */
int32_t wp_record_check(const uint8_t *h, uint32_t region, uint64_t first_page, uint32_t page_count, uint32_t *out);

/* Checks the checksum of h + payload (stored bytes, as wp_record_check said)
 * and decodes: lz4 and pages into out (page_count x 4096 bytes; pages writes
 * all of it, zero pages as zeros). Raw payloads are the pages themselves and
 * zero records have none: out is not written for them. Pages are checked in
 * this order: header + table CRC (BAD_CHECKSUM), table sum against stored
 * bytes and every blockBytes <= 4096 (BAD_SIZE), then each block's CRC
 * (BAD_CHECKSUM) and decode (BAD_PAYLOAD).
 * Returns the encoding (WP_RECORD_RAW/LZ4/ZERO/PAGES) or -EBADMSG. */
int32_t wp_record_decode(const wp_record_codec *c, const uint8_t *h, const uint8_t *payload, uint64_t stored,
                         uint8_t *out, uint64_t out_bytes, uint32_t *why_out);

/* Encoder options: lz4 blocks (each kept only when it is under 4096 bytes),
 * else every non-zero page raw. */
#define WP_RECORD_ENCODE_LZ4 1u

/* Bytes an encoding-3 record of n pages takes at most: header, table and
 * every page raw. */
#define WP_RECORD_PAGES_BOUND(n) (WP_RECORD_HEADER_BYTES + (uint64_t)(n) * (WP_RECORD_PAGES_ENTRY_BYTES + 4096u))

/* Encodes pages [first_page, first_page + pages) of region, whose contents
 * are data (pages x 4096 bytes), as one encoding-3 record into out: header,
 * table, blocks. All-zero pages get blockBytes 0; with WP_RECORD_ENCODE_LZ4
 * the others are LZ4 blocks (liblz4 LZ4_compress_default) when that is
 * under 4096 bytes, else raw. pages: 1 to WP_RECORD_PAGES_MAX_PAGES; out_cap
 * at least WP_RECORD_PAGES_BOUND(pages). Returns the bytes written, or
 * -EINVAL (pages or options out of range), -ENOBUFS (out_cap too small). */
int64_t wp_record_encode_pages(uint32_t region, uint64_t first_page, uint32_t pages, const uint8_t *data, uint32_t options,
                               uint8_t *out, uint64_t out_cap);

/* One record written by wp_record_encode_batch: 6 u32 each. */
#define WP_RECORD_BATCH_FIELDS 6u /* region, first page low, first page high, page count, encoding, bytes */

/* Bytes wp_record_encode_batch needs at most for n entries: each page can
 * start a record (a header) and be stored raw (a table entry and 4096). */
#define WP_RECORD_BATCH_BOUND(n) ((uint64_t)(n) * (WP_RECORD_HEADER_BYTES + WP_RECORD_PAGES_ENTRY_BYTES + 4096u))

/* Encodes a batch as wp_engine_next_batch returns it (n entries: regions,
 * pages, flags; the data of the entries whose flag is not WP_PAGE_ZERO (1)
 * packed in data, in entry order) into records laid back to back in out:
 * each maximal run of consecutive pages of one region flagged zero is one
 * zero record (encoding 2), each run of data pages is cut into encoding-3
 * records of at most max_pages pages (wp_record_encode_pages, options as
 * there). records_out gets WP_RECORD_BATCH_FIELDS u32 per record, in file
 * order (records_cap records at most: n is always enough). out_cap: at least
 * WP_RECORD_BATCH_BOUND(n). Returns the record count, or -EINVAL (max_pages
 * 0 or over WP_RECORD_PAGES_MAX_PAGES, options), -ENOBUFS (out_cap or
 * records_cap too small). */
int32_t wp_record_encode_batch(const uint32_t *regions, const uint64_t *pages, const uint8_t *flags, uint32_t n,
                               const uint8_t *data, uint32_t max_pages, uint32_t options, uint8_t *out, uint64_t out_cap,
                               uint32_t *records_out, uint32_t records_cap);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_RECORD_H */
