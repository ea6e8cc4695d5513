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

/* Why a record was refused (*why_out). */
#define WP_RECORD_OK 0
#define WP_RECORD_BAD_MAGIC 1     /* no "RCD1": corrupt or misaligned */
#define WP_RECORD_MISPLACED 2     /* region, first page or page count differ from the index */
#define WP_RECORD_BAD_ENCODING 3  /* unknown encoding byte, or reserved bytes not zero */
#define WP_RECORD_BAD_SIZE 4      /* stored bytes impossible for the encoding and page count */
#define WP_RECORD_BAD_CHECKSUM 5  /* CRC-32 of header and payload differs */
#define WP_RECORD_BAD_PAYLOAD 6   /* lz4: length prefix is not pageCount x 4096, or the block is malformed */

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
 * and decodes: lz4 into out (page_count x 4096 bytes). Raw payloads are the
 * pages themselves and zero records have none: out is not written for them.
 * Returns the encoding (WP_RECORD_RAW/LZ4/ZERO) or -EBADMSG. */
int32_t wp_record_decode(const wp_record_codec *c, const uint8_t *h, const uint8_t *payload, uint64_t stored,
                         uint8_t *out, uint64_t out_bytes, uint32_t *why_out);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* VMSNAP_RECORD_H */
