/*
 * Record encoding 3 ("pages", docs/format.md) through the one decoder, on
 * real files (a memfd read with pread like a snapshot file):
 *   - round trip of wp_record_encode_pages (lz4 and raw) and of
 *     wp_record_encode_batch (zero runs, data runs cut at max_pages) through
 *     wp_record_check / wp_record_decode / record_read, including a 256-page
 *     record read with the restorer's usual scratch (blocks decoded in place);
 *   - each refusal: a table byte, a block byte, a block CRC, blockBytes over
 *     4096, a table sum that disagrees with the stored bytes, an lz4 block that
 *     is not exactly 4096 bytes, impossible header sizes;
 *   - record_read_page reads only its page: a corrupt other block, or the
 *     record cut short after page k, does not stop page k; a bad block of k
 *     is -EBADMSG with *whole_out false, a bad table with *whole_out true.
 * Exit 0 pass, 1 fail.
 */
#define _GNU_SOURCE
#include "record.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <lz4.h>

#define PAGE 4096u

static int failures;

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "FAIL %s:%d: ", __func__, __LINE__);                                                       \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fputc('\n', stderr);                                                                                       \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)

static uint64_t rng = 0x243f6a8885a308d3ull;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Page kinds: 0 zero, 1 random (incompressible: raw), 2 text (lz4). */
static void fill(uint8_t *p, int kind, unsigned seed)
{
    if (kind == 0)
        memset(p, 0, PAGE);
    else if (kind == 1)
        for (unsigned i = 0; i < PAGE; i += 8)
            memcpy(p + i, &(uint64_t){rnd()}, 8);
    else
        for (unsigned i = 0; i < PAGE; i++)
            p[i] = (uint8_t)("vmsnap page "[(i + seed) % 12] + (i / 512));
}

static uint32_t u32_at(const uint8_t *b, size_t at)
{
    uint32_t v;
    memcpy(&v, b + at, 4);
    return v;
}

static void put_u32(uint8_t *b, size_t at, uint32_t v)
{
    memcpy(b + at, &v, 4);
}

/* Recomputes the header CRC (header + table) after a test edited the table. */
static void reseal(uint8_t *rec)
{
    uint32_t n = u32_at(rec, 16);
    put_u32(rec, 28, record_crc32(record_crc32(0, rec, 28), rec + 32, (size_t)n * PAGES_ENTRY));
}

/* Offset in rec of block k. */
static size_t block_at(const uint8_t *rec, uint32_t k)
{
    uint32_t n = u32_at(rec, 16);
    size_t at = 32 + (size_t)n * PAGES_ENTRY;
    for (uint32_t j = 0; j < k; j++)
        at += u32_at(rec, 32 + (size_t)j * PAGES_ENTRY);
    return at;
}

/* wp_record_check + wp_record_decode of rec (as the TypeScript readers call them): the encoding or -EBADMSG, why. */
static int decode(const wp_record_codec *c, const uint8_t *rec, uint8_t *out, uint32_t *why)
{
    uint32_t n = u32_at(rec, 16), check[2];
    int rc = wp_record_check(rec, u32_at(rec, 4), ((uint64_t)u32_at(rec, 12) << 32) | u32_at(rec, 8), n, check);
    if (rc < 0) {
        *why = check[1];
        return rc;
    }
    return wp_record_decode(c, rec, rec + 32, check[0], out, (uint64_t)n * PAGE, why);
}

/* A memfd holding `len` bytes of rec at offset `at` (a record not at offset 0, as in a snapshot file). */
static int file_with(const uint8_t *rec, size_t len, size_t at)
{
    int fd = memfd_create("test_record", MFD_CLOEXEC);
    if (fd < 0 || pwrite(fd, rec, len, (off_t)at) != (ssize_t)len) {
        perror("memfd");
        exit(1);
    }
    return fd;
}

/* record_read with the restorer's scratch (pages * 4096 + 1024). */
static int read_whole(const wp_record_codec *c, int fd, size_t at, const uint8_t *rec, uint8_t *out, uint32_t *why)
{
    uint32_t n = u32_at(rec, 16);
    size_t cap = (size_t)n * PAGE + 1024;
    uint8_t *scratch = malloc(cap);
    int rc = record_read(c, fd, false, at, u32_at(rec, 4), ((uint64_t)u32_at(rec, 12) << 32) | u32_at(rec, 8), n, out, scratch,
                         cap, why);
    free(scratch);
    return rc;
}

static int read_page(const wp_record_codec *c, int fd, size_t at, const uint8_t *rec, uint32_t k, uint8_t *out, uint32_t *why,
                     bool *whole)
{
    uint32_t n = u32_at(rec, 16);
    size_t cap = RECORD_HEADER_BYTES + (size_t)n * PAGES_ENTRY + PAGE;
    uint8_t *scratch = malloc(cap);
    *why = 0;
    *whole = true;
    int rc = record_read_page(c, fd, at, u32_at(rec, 4), ((uint64_t)u32_at(rec, 12) << 32) | u32_at(rec, 8), n, k, out,
                              scratch, cap, why, whole);
    free(scratch);
    return rc;
}

/* 16 pages: zero, random and text, in a fixed order. */
static const int kinds16[16] = {2, 0, 1, 2, 2, 1, 0, 0, 2, 1, 2, 2, 0, 1, 2, 2};

static uint8_t *pages_of(const int *kinds, uint32_t n)
{
    uint8_t *d = malloc((size_t)n * PAGE);
    for (uint32_t k = 0; k < n; k++)
        fill(d + (size_t)k * PAGE, kinds[k % 16], k);
    return d;
}

static uint8_t *encode(const uint8_t *data, uint32_t n, uint32_t options, int64_t *len)
{
    uint8_t *rec = malloc(WP_RECORD_PAGES_BOUND(n));
    *len = wp_record_encode_pages(3, 0x100000007ull, n, data, options, rec, WP_RECORD_PAGES_BOUND(n));
    return rec;
}

static void test_round_trip(const wp_record_codec *c)
{
    uint8_t *data = pages_of(kinds16, 16), *out = malloc(16 * PAGE);
    for (uint32_t options = 0; options <= WP_RECORD_ENCODE_LZ4; options++) {
        int64_t len;
        uint8_t *rec = encode(data, 16, options, &len);
        CHECK(len > 32, "encode: %lld", (long long)len);
        CHECK(rec[20] == WP_RECORD_PAGES && u32_at(rec, 16) == 16 && u32_at(rec, 24) == len - 32, "header");
        for (uint32_t k = 0; k < 16; k++) {
            uint32_t bytes = u32_at(rec, 32 + k * PAGES_ENTRY);
            uint32_t want = kinds16[k] == 0 ? 0 : kinds16[k] == 1 || !options ? PAGE : 1;
            CHECK(want == 1 ? bytes > 0 && bytes < PAGE : bytes == want, "options %u page %u: blockBytes %u", options, k, bytes);
        }
        uint32_t why = 0;
        memset(out, 0xa5, 16 * PAGE);
        int rc = decode(c, rec, out, &why);
        CHECK(rc == WP_RECORD_PAGES && memcmp(out, data, 16 * PAGE) == 0, "decode: %d why %u", rc, why);
        int fd = file_with(rec, (size_t)len, 4096 + 17);
        memset(out, 0xa5, 16 * PAGE);
        rc = read_whole(c, fd, 4096 + 17, rec, out, &why);
        CHECK(rc == RECORD_PAGES && memcmp(out, data, 16 * PAGE) == 0, "record_read: %d why %u", rc, why);
        for (uint32_t k = 0; k < 16; k++) {
            uint8_t page[PAGE];
            bool whole;
            memset(page, 0xa5, PAGE);
            rc = read_page(c, fd, 4096 + 17, rec, k, page, &why, &whole);
            int want = kinds16[k] == 0 ? RECORD_ZERO : kinds16[k] == 1 || !options ? RECORD_RAW : RECORD_LZ4;
            CHECK(rc == want, "read_page %u: %d (want %d) why %u", k, rc, want, why);
            if (rc == RECORD_RAW || rc == RECORD_LZ4)
                CHECK(memcmp(page, data + (size_t)k * PAGE, PAGE) == 0, "read_page %u: wrong bytes", k);
        }
        close(fd);
        free(rec);
    }
    free(data);
    free(out);
}

/* 256 pages (the most): raw pages make stored bytes exceed pages * 4096 + 1024, so record_read decodes in place. */
static void test_largest(const wp_record_codec *c)
{
    static const int kinds[16] = {1, 2, 1, 0, 2, 2, 1, 1, 2, 1, 0, 2, 1, 1, 2, 1};
    uint8_t *data = pages_of(kinds, 256), *out = malloc(256 * PAGE);
    for (uint32_t options = 0; options <= WP_RECORD_ENCODE_LZ4; options++) {
        int64_t len;
        uint8_t *rec = encode(data, 256, options, &len);
        int fd = file_with(rec, (size_t)len, 0);
        uint32_t why = 0;
        memset(out, 0xa5, 256 * PAGE);
        int rc = read_whole(c, fd, 0, rec, out, &why);
        CHECK(rc == RECORD_PAGES && memcmp(out, data, 256 * PAGE) == 0, "options %u: record_read %d why %u", options, rc, why);
        close(fd);
        free(rec);
    }
    int64_t len;
    uint8_t *big = malloc(WP_RECORD_PAGES_BOUND(257));
    len = wp_record_encode_pages(0, 0, 257, big, 0, big, WP_RECORD_PAGES_BOUND(257));
    CHECK(len == -EINVAL, "257 pages: %lld", (long long)len);
    len = wp_record_encode_pages(0, 0, 2, data, 0, big, WP_RECORD_PAGES_BOUND(2) - 1);
    CHECK(len == -ENOBUFS, "small out: %lld", (long long)len);
    free(big);
    free(data);
    free(out);
}

/* Decodes rec (edited) through both paths; both must refuse with why. */
static void expect_refused(const wp_record_codec *c, const char *what, const uint8_t *rec, size_t len, uint32_t want_why)
{
    uint32_t n = u32_at(rec, 16), why = 0;
    uint8_t *out = malloc((size_t)n * PAGE);
    int rc = decode(c, rec, out, &why);
    CHECK(rc == -EBADMSG && why == want_why, "%s: decode %d why %u (want %u)", what, rc, why, want_why);
    int fd = file_with(rec, len, 512);
    why = 0;
    rc = read_whole(c, fd, 512, rec, out, &why);
    CHECK(rc == -EBADMSG && why == want_why, "%s: record_read %d why %u (want %u)", what, rc, why, want_why);
    close(fd);
    free(out);
}

static void test_refusals(const wp_record_codec *c)
{
    uint8_t *data = pages_of(kinds16, 16);
    int64_t len;
    uint8_t *good = encode(data, 16, WP_RECORD_ENCODE_LZ4, &len), *rec = malloc((size_t)len + 8192);
    size_t table = 32, lz4_page = 3, raw_page = 2; /* kinds16: 3 is text, 2 random */
#define FRESH() memcpy(rec, good, (size_t)len)

    FRESH();
    rec[table + lz4_page * PAGES_ENTRY + 5] ^= 0x10; /* a table byte (page 3's CRC): the header CRC covers the table */
    expect_refused(c, "table byte", rec, (size_t)len, WP_RECORD_BAD_CHECKSUM);

    FRESH();
    rec[block_at(rec, lz4_page) + 7] ^= 1; /* a block byte */
    expect_refused(c, "lz4 block byte", rec, (size_t)len, WP_RECORD_BAD_CHECKSUM);
    FRESH();
    rec[block_at(rec, raw_page) + 4095] ^= 0x80;
    expect_refused(c, "raw block byte", rec, (size_t)len, WP_RECORD_BAD_CHECKSUM);

    FRESH();
    put_u32(rec, table + raw_page * PAGES_ENTRY + 4, u32_at(rec, table + raw_page * PAGES_ENTRY + 4) + 1); /* a block CRC, table resealed */
    reseal(rec);
    expect_refused(c, "block CRC", rec, (size_t)len, WP_RECORD_BAD_CHECKSUM);

    FRESH();
    put_u32(rec, table + 1 * PAGES_ENTRY + 4, 1); /* a zero page (no block) with a CRC that is not CRC-32 of nothing */
    reseal(rec);
    expect_refused(c, "zero page CRC", rec, (size_t)len, WP_RECORD_BAD_CHECKSUM);

    /* blockBytes 4097 on page 1 (zero), page 2 (raw) 4095 and page 5 (raw) 0: the table's sum still equals the stored bytes */
    FRESH();
    uint32_t lz4_bytes = u32_at(rec, table + lz4_page * PAGES_ENTRY);
    put_u32(rec, table + 1 * PAGES_ENTRY, 4097);
    put_u32(rec, table + raw_page * PAGES_ENTRY, 4095);
    put_u32(rec, table + 5 * PAGES_ENTRY, 0);
    reseal(rec);
    expect_refused(c, "blockBytes 4097", rec, (size_t)len, WP_RECORD_BAD_SIZE);

    FRESH();
    put_u32(rec, table + lz4_page * PAGES_ENTRY, lz4_bytes - 1); /* the table's sum is 1 short of the stored bytes */
    reseal(rec);
    expect_refused(c, "sum mismatch", rec, (size_t)len, WP_RECORD_BAD_SIZE);

    /* An lz4 block with a good CRC that decodes to 2048 bytes, not 4096 (the rest of the record follows it). */
    {
        uint8_t half[PAGE], small[PAGE];
        fill(half, 2, 0);
        int n = LZ4_compress_default((const char *)half, (char *)small, 2048, (int)PAGE);
        size_t at = block_at(good, lz4_page), old = lz4_bytes, tail = (size_t)len - at - old;
        memcpy(rec, good, at);
        memcpy(rec + at, small, (size_t)n);
        memcpy(rec + at + n, good + at + old, tail);
        put_u32(rec, table + lz4_page * PAGES_ENTRY, (uint32_t)n);
        put_u32(rec, table + lz4_page * PAGES_ENTRY + 4, record_crc32(0, small, (size_t)n));
        put_u32(rec, 24, u32_at(good, 24) - (uint32_t)old + (uint32_t)n);
        reseal(rec);
        expect_refused(c, "lz4 block of 2048 bytes", rec, at + (size_t)n + tail, WP_RECORD_BAD_PAYLOAD);
    }

    /* Header sizes impossible for encoding 3 (wp_record_check, before any allocation). */
    uint32_t out[2];
    FRESH();
    put_u32(rec, 24, 16 * PAGES_ENTRY - 1);
    CHECK(wp_record_check(rec, 3, 0x100000007ull, 16, out) == -EBADMSG && out[1] == WP_RECORD_BAD_SIZE, "stored < table");
    put_u32(rec, 24, 16 * (PAGES_ENTRY + PAGE) + 1);
    CHECK(wp_record_check(rec, 3, 0x100000007ull, 16, out) == -EBADMSG && out[1] == WP_RECORD_BAD_SIZE, "stored > table + pages");
    put_u32(rec, 24, 16 * (PAGES_ENTRY + PAGE));
    CHECK(wp_record_check(rec, 3, 0x100000007ull, 16, out) == 0 && out[0] == 16 * (PAGES_ENTRY + PAGE), "all raw is the most");
    put_u32(rec, 16, 257);
    put_u32(rec, 24, 257 * PAGES_ENTRY);
    CHECK(wp_record_check(rec, 3, 0x100000007ull, 257, out) == -EBADMSG && out[1] == WP_RECORD_BAD_SIZE, "257 pages");
    FRESH();
    rec[20] = 4;
    CHECK(wp_record_check(rec, 3, 0x100000007ull, 16, out) == -EBADMSG && out[1] == WP_RECORD_BAD_ENCODING, "encoding 4");
#undef FRESH
    free(rec);
    free(good);
    free(data);
}

static void test_read_page(const wp_record_codec *c)
{
    uint8_t *data = pages_of(kinds16, 16), page[PAGE];
    int64_t len;
    uint8_t *rec = encode(data, 16, WP_RECORD_ENCODE_LZ4, &len);
    uint32_t why;
    bool whole;

    /* Blocks 2 (raw) and 9 (raw) and 10 (lz4) corrupt: every other page still decodes; those are -EBADMSG, whole false. */
    uint8_t *bad = malloc((size_t)len);
    memcpy(bad, rec, (size_t)len);
    bad[block_at(bad, 2) + 100] ^= 1;
    bad[block_at(bad, 9)] ^= 1;
    bad[block_at(bad, 10) + 1] ^= 1;
    int fd = file_with(bad, (size_t)len, 4096);
    for (uint32_t k = 0; k < 16; k++) {
        memset(page, 0xa5, PAGE);
        int rc = read_page(c, fd, 4096, bad, k, page, &why, &whole);
        if (k == 2 || k == 9 || k == 10)
            CHECK(rc == -EBADMSG && why == WP_RECORD_BAD_CHECKSUM && !whole, "bad block %u: %d why %u whole %d", k, rc, why, whole);
        else
            CHECK(rc >= 0 && (rc == RECORD_ZERO || memcmp(page, data + (size_t)k * PAGE, PAGE) == 0), "page %u beside bad blocks: %d", k, rc);
    }
    uint8_t *all = malloc(16 * PAGE);
    int rc = read_whole(c, fd, 4096, bad, all, &why);
    CHECK(rc == -EBADMSG && why == WP_RECORD_BAD_CHECKSUM, "the whole record with bad blocks: %d", rc);
    free(all);
    close(fd);

    /* The record cut short after block 4: pages 0-4 read, page 5 is a short read, the whole record too. */
    size_t cut = block_at(rec, 5);
    fd = file_with(rec, cut, 0);
    for (uint32_t k = 0; k < 5; k++) {
        rc = read_page(c, fd, 0, rec, k, page, &why, &whole);
        CHECK(rc >= 0 && (rc == RECORD_ZERO || memcmp(page, data + (size_t)k * PAGE, PAGE) == 0), "cut record, page %u: %d", k, rc);
    }
    CHECK(read_page(c, fd, 0, rec, 5, page, &why, &whole) == -EIO, "cut record, page 5");
    uint8_t *whole_buf = malloc(16 * PAGE);
    CHECK(read_whole(c, fd, 0, rec, whole_buf, &why) == -EIO, "cut record, whole");
    free(whole_buf);
    close(fd);

    /* A bad table (or header): every page is refused, whole true. */
    memcpy(bad, rec, (size_t)len);
    bad[32 + 7 * PAGES_ENTRY] ^= 1;
    fd = file_with(bad, (size_t)len, 0);
    rc = read_page(c, fd, 0, bad, 3, page, &why, &whole);
    CHECK(rc == -EBADMSG && why == WP_RECORD_BAD_CHECKSUM && whole, "bad table: %d why %u whole %d", rc, why, whole);
    close(fd);
    memcpy(bad, rec, (size_t)len);
    put_u32(bad, 32 + 3 * PAGES_ENTRY, u32_at(bad, 32 + 3 * PAGES_ENTRY) - 1);
    reseal(bad);
    fd = file_with(bad, (size_t)len, 0);
    rc = read_page(c, fd, 0, bad, 0, page, &why, &whole);
    CHECK(rc == -EBADMSG && why == WP_RECORD_BAD_SIZE && whole, "table sum: %d why %u whole %d", rc, why, whole);
    rc = read_page(c, fd, 0, bad, 16, page, &why, &whole);
    CHECK(rc == -EINVAL, "page 16 of 16: %d", rc);
    close(fd);
    /* The index says another region: the header is refused for every page. */
    fd = file_with(rec, (size_t)len, 0);
    uint8_t scratch[RECORD_HEADER_BYTES + 16 * PAGES_ENTRY + PAGE];
    rc = record_read_page(c, fd, 0, 4, 0x100000007ull, 16, 0, page, scratch, sizeof scratch, &why, &whole);
    CHECK(rc == -EBADMSG && why == WP_RECORD_MISPLACED && whole, "misplaced: %d why %u", rc, why);
    rc = record_read_page(c, fd, 0, 3, 0x100000007ull, 16, 0, page, scratch, sizeof scratch - 1, &why, &whole);
    CHECK(rc == -ENOBUFS, "small scratch: %d", rc);
    close(fd);
    free(bad);
    free(rec);
    free(data);
}

/* A batch as the engine returns it: zero runs become zero records, data runs encoding-3 records of at most max_pages. */
static void test_batch(const wp_record_codec *c)
{
    enum { N = 48 };
    uint32_t regions[N];
    uint64_t pages[N];
    uint8_t flags[N];
    uint8_t *data = malloc(N * PAGE);
    uint32_t packed = 0;
    for (uint32_t i = 0; i < N; i++) {
        regions[i] = i < 40 ? 0 : 1;
        pages[i] = i < 30 ? 100 + i : i < 40 ? 200 + i : (1ull << 33) + i; /* a gap at 30, a region at 40 */
        flags[i] = (i >= 3 && i < 7) || i == 45 ? 1 : 0;
        if (!flags[i])
            fill(data + (size_t)packed++ * PAGE, 1 + (int)(i % 2), i);
    }
    /* Records: [0,3) [3,7)z [7,23) [23,30) [30,40) [40,45) [45]z [46,48) */
    static const uint32_t want[][3] = {{0, 3, 3}, {3, 4, 2}, {7, 16, 3}, {23, 7, 3}, {30, 10, 3}, {40, 5, 3}, {45, 1, 2}, {46, 2, 3}};
    uint64_t cap = WP_RECORD_BATCH_BOUND(N);
    uint8_t *out = malloc(cap), *pagebuf = malloc(16 * PAGE);
    uint32_t d[N * WP_RECORD_BATCH_FIELDS];
    int n = wp_record_encode_batch(regions, pages, flags, N, data, 16, WP_RECORD_ENCODE_LZ4, out, cap, d, N);
    CHECK(n == 8, "records: %d", n);
    size_t at = 0;
    uint32_t p = 0;
    for (int r = 0; r < n && r < 8; r++) {
        const uint32_t *e = d + r * WP_RECORD_BATCH_FIELDS;
        uint32_t i = want[r][0];
        uint64_t first = ((uint64_t)e[2] << 32) | e[1];
        CHECK(e[0] == regions[i] && first == pages[i] && e[3] == want[r][1] && e[4] == want[r][2], "record %d: %u %llu %u %u", r, e[0],
              (unsigned long long)first, e[3], e[4]);
        uint32_t why = 0;
        int rc = decode(c, out + at, pagebuf, &why);
        CHECK(rc == (int)e[4], "record %d decodes: %d why %u", r, rc, why);
        if (e[4] == WP_RECORD_PAGES) {
            CHECK(memcmp(pagebuf, data + (size_t)p * PAGE, (size_t)e[3] * PAGE) == 0, "record %d: pages differ", r);
            p += e[3];
        } else {
            /* record_read_page answers RECORD_ZERO for a zero record (its header checked): a fault there installs its page alone */
            int fd = file_with(out + at, e[5], 0);
            bool whole;
            CHECK(read_page(c, fd, 0, out + at, 0, pagebuf, &why, &whole) == WP_RECORD_ZERO, "zero record: read_page");
            close(fd);
        }
        at += e[5];
    }
    CHECK(wp_record_encode_batch(regions, pages, flags, N, data, 16, 0, out, cap - 1, d, N) == -ENOBUFS, "small out");
    CHECK(wp_record_encode_batch(regions, pages, flags, N, data, 16, 0, out, cap, d, 7) == -ENOBUFS, "few records");
    CHECK(wp_record_encode_batch(regions, pages, flags, N, data, 0, 0, out, cap, d, N) == -EINVAL, "max_pages 0");
    CHECK(wp_record_encode_batch(regions, pages, flags, N, data, 257, 0, out, cap, d, N) == -EINVAL, "max_pages 257");
    CHECK(wp_record_encode_batch(regions, pages, flags, N, data, 16, 2, out, cap, d, N) == -EINVAL, "options 2");

    /* The native writer's encoder (record_encode_iov) writes the same bytes through iovecs, raw blocks
     * pointing into data (not copied), lz4 blocks into its own buffer; and the same record fields. */
    for (int lz4 = 0; lz4 <= 1; lz4++) {
        uint32_t fields[N * WP_RECORD_BATCH_FIELDS];
        struct iovec iov[2 * N];
        struct record_iov enc = {.meta = malloc(N * (WP_RECORD_HEADER_BYTES + WP_RECORD_PAGES_ENTRY_BYTES)),
                                 .blocks = malloc(N * PAGE), .iov = iov, .fields = fields};
        int want_n = wp_record_encode_batch(regions, pages, flags, N, data, 16, lz4 ? WP_RECORD_ENCODE_LZ4 : 0, out, cap, d, N);
        int got_n = record_encode_iov(regions, pages, flags, N, data, 16, lz4, &enc);
        CHECK(got_n == want_n && memcmp(fields, d, (size_t)want_n * WP_RECORD_BATCH_FIELDS * 4) == 0, "iov %d: records %d", lz4, got_n);
        uint8_t *joined = malloc(cap);
        size_t len = 0;
        bool into_data = false;
        for (uint32_t k = 0; k < enc.count; k++) {
            memcpy(joined + len, iov[k].iov_base, iov[k].iov_len);
            len += iov[k].iov_len;
            into_data |= (uint8_t *)iov[k].iov_base >= data && (uint8_t *)iov[k].iov_base < data + N * PAGE;
        }
        size_t want_len = 0;
        for (int r = 0; r < want_n; r++)
            want_len += d[r * WP_RECORD_BATCH_FIELDS + 5];
        CHECK(len == want_len && len == enc.bytes && memcmp(joined, out, len) == 0, "iov %d: bytes differ (%zu, %zu)", lz4, len, want_len);
        CHECK(into_data == !lz4, "iov %d: raw blocks must be written from data in place", lz4);
        CHECK(enc.count < (uint32_t)(2 * want_n), "iov %d: adjacent pieces merged (%u iovecs)", lz4, enc.count);
        CHECK(record_encode_iov(regions, pages, flags, N, data, 0, lz4, &enc) == -EINVAL, "iov max_pages 0");
        free(joined);
        free(enc.meta);
        free(enc.blocks);
    }
    free(out);
    free(pagebuf);
    free(data);
}

/* The checksum is the CRC-32 of zlib's crc32 and node:zlib's (ISO-HDLC): its
 * check value, and a running CRC continued as zlib continues it (a record's
 * header, then its payload). */
static void test_crc32(void)
{
    const uint8_t *digits = (const uint8_t *)"123456789";
    CHECK(record_crc32(0, digits, 9) == 0xCBF43926u, "check value %08x", record_crc32(0, digits, 9));
    CHECK(record_crc32(record_crc32(0, digits, 4), digits + 4, 5) == 0xCBF43926u, "continued");
    CHECK(record_crc32(0x1234u, NULL, 0) == 0x1234u, "empty");
}

int main(void)
{
    wp_record_codec *c = wp_record_codec_create();
    test_crc32();
    test_round_trip(c);
    test_largest(c);
    test_refusals(c);
    test_read_page(c);
    test_batch(c);
    wp_record_codec_destroy(c);
    if (failures)
        fprintf(stderr, "test_record: %d failures\n", failures);
    else
        printf("test_record: ok\n");
    return failures ? 1 : 0;
}
