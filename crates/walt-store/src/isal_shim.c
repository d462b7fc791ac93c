/* A thin C layer over ISA-L's inflate, so that Rust never depends on the
 * layout of `struct inflate_state`. It inflates the body of one gzip member
 * whose header the caller (GzipReader) has already read: the deflate data,
 * then the 8-byte member trailer, which ISA-L reads and checks itself
 * (ISAL_GZIP_NO_HDR_VER: CRC-32 and size; a mismatch is
 * ISAL_INCORRECT_CHECKSUM). */
#include <stdint.h>
#include <stdlib.h>
#include <isa-l/igzip_lib.h>

struct inflate_state *walt_isal_new(void)
{
	struct inflate_state *s = malloc(sizeof(*s));
	if (s) {
		isal_inflate_init(s);
		s->crc_flag = ISAL_GZIP_NO_HDR_VER;
	}
	return s;
}

void walt_isal_free(struct inflate_state *s)
{
	free(s);
}

void walt_isal_reset(struct inflate_state *s)
{
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP_NO_HDR_VER;
}

/* One step: returns ISA-L's code (< 0: corrupt data); `*used` and
 * `*produced` are what was consumed and written; `*finished` is 1 once the
 * end of the deflate stream was reached (and everything written). */
int walt_isal_inflate(struct inflate_state *s, const uint8_t *in, uint32_t in_len,
		      uint8_t *out, uint32_t out_len, uint32_t *used,
		      uint32_t *produced, int *finished)
{
	s->next_in = (uint8_t *)in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	int r = isal_inflate(s);
	*used = in_len - s->avail_in;
	*produced = out_len - s->avail_out;
	*finished = s->block_state == ISAL_BLOCK_FINISH;
	return r;
}
