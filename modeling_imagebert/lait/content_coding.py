"""HTTP `Content-Encoding` decoded in a stream that stops at a byte bound, for pages (stage "warc") and images
(stage 2).

A compressed body is small on the wire and may be huge decoded (1.96 MB of gzip decoding to 1.9 GB reached
4.75 GB of memory when decoded at once before the size check). `StreamDecoder` decodes chunk by chunk, asking
the decompressor for at most the bytes still allowed, so memory stays under the bound plus one chunk whatever the
ratio; past the bound it raises `DecodedTooLarge`, a body that does not decode raises `CorruptEncoding`.

Codings: `gzip` / `x-gzip` (several members one after the other too), `deflate` (zlib-wrapped as the RFC says,
or raw deflate as some servers send), `br` (with the `brotli` package, version 1.2 or later, whose decompressor
takes an output limit; without it a `br` body is `CorruptEncoding`), and `identity` / none (passed through,
bounded the same way). Any other coding is `UnsupportedEncoding`.
"""

from __future__ import annotations

import zlib

_CHUNK = 1 << 16


class DecodedTooLarge(ValueError):
    """The decoded body passed the bound."""


class CorruptEncoding(ValueError):
    """The body does not decode with its declared coding."""


class UnsupportedEncoding(ValueError):
    """A coding this module does not decode."""


def _brotli_decompressor():
    try:
        import brotli
    except ImportError:
        return None
    decompressor = brotli.Decompressor()
    # Before 1.2, `process` has no output limit: a small body could decode to gigabytes in one call.
    return decompressor if hasattr(decompressor, "can_accept_more_data") else None


class StreamDecoder:
    """Decodes one body coded with `encoding` (a Content-Encoding value; "" = identity), chunk by chunk, keeping
    at most `limit` decoded bytes. `feed(chunk)` returns the decoded bytes of that chunk, `finish()` the rest and
    checks the stream ended; both raise `DecodedTooLarge` past `limit` and `CorruptEncoding` on bad data."""

    def __init__(self, encoding: str, limit: int):
        self.encoding = (encoding or "identity").strip().lower()
        self.limit = int(limit)
        self.produced = 0
        self._zlib = None
        self._brotli = None
        self._pending = b""  # deflate: the first bytes, until the wrapper (zlib or raw) is known
        if self.encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.encoding == "br":
            self._brotli = _brotli_decompressor()
            if self._brotli is None:
                raise CorruptEncoding("br body without a brotli decoder (the brotli package, 1.2 or later)")
        elif self.encoding not in ("identity", "deflate"):
            raise UnsupportedEncoding(f"unsupported Content-Encoding {self.encoding!r}")

    def _count(self, data: bytes) -> bytes:
        self.produced += len(data)
        if self.produced > self.limit:
            raise DecodedTooLarge(f"decoded body over {self.limit} bytes")
        return data

    def _room(self) -> int:
        # One byte more than allowed, so that passing the bound is seen.
        return max(self.limit - self.produced, 0) + 1

    def _inflate(self, data: bytes) -> bytes:
        out = []
        try:
            while True:
                piece = self._zlib.decompress(data, self._room())
                out.append(self._count(piece))
                data = self._zlib.unconsumed_tail
                if self._zlib.eof:
                    rest = self._zlib.unused_data + data
                    if self.encoding in ("gzip", "x-gzip") and rest.startswith(b"\x1f\x8b"):
                        # The next gzip member (a body may be several members one after the other).
                        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        data = rest
                        continue
                    return b"".join(out)  # what follows the last member is not ours to decode
                if not data:
                    return b"".join(out)
        except zlib.error as error:
            raise CorruptEncoding(f"{self.encoding} body does not decode ({error})") from None

    def feed(self, chunk: bytes) -> bytes:
        """The decoded bytes of `chunk` (maybe empty: a decoder may wait for more input)."""
        if not chunk:
            return b""
        if self.encoding == "identity":
            return self._count(chunk)
        if self._brotli is not None:
            return self._feed_brotli(chunk)
        if self._zlib is None:  # deflate: zlib-wrapped (RFC 9110) or raw, told by the first two bytes
            self._pending += chunk
            if len(self._pending) < 2:
                return b""
            first, second = self._pending[0], self._pending[1]
            wrapped = first & 0x0F == 8 and (first * 256 + second) % 31 == 0
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            chunk, self._pending = self._pending, b""
        return self._inflate(chunk)

    def _feed_brotli(self, chunk: bytes) -> bytes:
        import brotli

        out = []
        try:
            piece = self._brotli.process(chunk, output_buffer_limit=self._room())
            out.append(self._count(piece))
            while not self._brotli.can_accept_more_data():
                out.append(self._count(self._brotli.process(b"", output_buffer_limit=self._room())))
        except brotli.error as error:
            raise CorruptEncoding(f"br body does not decode ({error})") from None
        return b"".join(out)

    def finish(self) -> bytes:
        """The last decoded bytes; raises `CorruptEncoding` when the coded stream was cut short."""
        if self.encoding == "identity":
            return b""
        if self._brotli is not None:
            if not self._brotli.is_finished():
                raise CorruptEncoding("br body cut short")
            return b""
        if self._zlib is None:
            if self._pending:
                raise CorruptEncoding("deflate body cut short")
            return b""
        try:
            rest = self._count(self._zlib.flush(self._room()))
        except zlib.error as error:
            raise CorruptEncoding(f"{self.encoding} body does not decode ({error})") from None
        if not self._zlib.eof:
            raise CorruptEncoding(f"{self.encoding} body cut short")
        return rest


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from its Content-Encoding, at most `limit` bytes (see `StreamDecoder` for the errors); the
    body is fed in 64 KB pieces, so the decoded bytes are the only large allocation."""
    decoder = StreamDecoder(encoding, limit)
    out = [decoder.feed(body[start : start + _CHUNK]) for start in range(0, len(body), _CHUNK)]
    out.append(decoder.finish())
    return b"".join(out)


__all__ = ["CorruptEncoding", "DecodedTooLarge", "StreamDecoder", "UnsupportedEncoding", "decode_body"]
