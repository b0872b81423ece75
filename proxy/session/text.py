"""Statement text as the server will read it: the client encoding and standard_conforming_strings.

The lexer must see what PostgreSQL sees. PostgreSQL converts a Query from the client encoding
before lexing; pgwarden decodes with a Python codec. Where the two could differ on a byte
sequence (a multibyte character whose trail byte is a backslash), or where backslashes in
strings are read differently (standard_conforming_strings off), restricted roles' statements
are refused. Pure: it follows the ParameterStatus messages it is given.
"""

from __future__ import annotations

__all__ = ["TextReader", "PG_ENCODINGS", "SAFE_ENCODINGS"]

#: PostgreSQL encoding names -> Python codecs, for decoding statement text.
PG_ENCODINGS = {
    "UTF8": "utf-8", "UNICODE": "utf-8", "SQL_ASCII": "ascii", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
    "LATIN9": "iso8859-15", "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252", "GBK": "gbk",
    "GB18030": "gb18030", "BIG5": "big5", "SJIS": "shift_jis", "EUC_JP": "euc_jp", "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312", "UHC": "cp949", "KOI8R": "koi8-r",
}
#: Encodings whose Python codec reads every byte sequence as PostgreSQL's conversion does, checked
#: exhaustively for a trail byte that could be read as ASCII (\\ or '). SJIS and SHIFT_JIS_2004 are
#: not among them: PostgreSQL's SJIS takes pairs such as 0x87 0x5C that Python's codec does not,
#: which once let a restricted role smuggle a whole statement past the parser in a "string".
SAFE_ENCODINGS = frozenset({
    "UTF8", "UNICODE", "GBK", "GB18030", "BIG5", "UHC", "EUC_JP", "EUC_KR", "EUC_CN", "LATIN1", "LATIN2", "LATIN9",
    "WIN1250", "WIN1251", "WIN1252", "KOI8R",
})


class TextReader:
    """The session's client encoding and how trustworthy a decoding with it is."""

    __slots__ = ("encoding", "parameters", "_encoding_problem", "_scs_problem", "undecodable")

    def __init__(self) -> None:
        self.encoding = "utf-8"
        self.parameters: dict[str, str] = {}
        self._encoding_problem: str | None = None
        self._scs_problem: str | None = None
        self.undecodable = False  # the last decode() met bytes that are not valid in the encoding

    def track(self, name: str, value: str) -> None:
        """A ParameterStatus from the server."""
        self.parameters[name] = value
        if name == "client_encoding":
            self.encoding = PG_ENCODINGS.get(value.upper()) or "utf-8"
            self._encoding_problem = None if value.upper() in SAFE_ENCODINGS else (
                f"client_encoding {value} cannot be decoded exactly as the server does; "
                "use UTF8, GBK, GB18030 or another encoding pgwarden knows")
        elif name == "standard_conforming_strings":
            self._scs_problem = None if value == "on" else (
                "standard_conforming_strings is off, so backslashes in strings would be read differently")

    def decode(self, sql: bytes) -> str:
        """Text as the server will read it; bytes that do not decode are noted (``undecodable``)."""
        try:
            self.undecodable = False
            return sql.decode(self.encoding)
        except UnicodeDecodeError:
            self.undecodable = True
            return sql.decode(self.encoding, "replace")

    def encode(self, text: str) -> bytes:
        return text.encode(self.encoding, "replace")

    @property
    def problem(self) -> str | None:
        """Why the last decoded statement cannot be analysed exactly as the server reads it, if so."""
        return self._encoding_problem or self._scs_problem or (
            f"the statement is not valid {self.parameters.get('client_encoding', 'UTF8')} text"
            if self.undecodable else None)
