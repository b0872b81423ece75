"""Message type bytes and protocol constants.

Frontend and backend share letters with different meanings ('D' is Describe
from the client and DataRow from the server), so they live in two namespaces.
"""

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


class F:
    """Frontend (client -> server) message types, as ints (bytes index to ints)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class B:
    """Backend (server -> client) message types."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    COPY_BOTH_RESPONSE = ord("W")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class Auth:
    """AuthenticationRequest sub-codes."""

    OK = 0
    CLEARTEXT = 3
    MD5 = 5
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


class SqlState:
    """The SQLSTATEs pgwarden itself raises (client libraries map them to exception classes)."""

    PROTOCOL_VIOLATION = "08P01"
    CONNECTION_FAILURE = "08006"
    CONNECTION_REJECTED = "08004"
    INVALID_AUTHORIZATION = "28000"
    INVALID_PASSWORD = "28P01"
    INSUFFICIENT_PRIVILEGE = "42501"
    FEATURE_NOT_SUPPORTED = "0A000"
    TOO_MANY_CONNECTIONS = "53300"
    ADMIN_SHUTDOWN = "57P01"
    CANNOT_CONNECT_NOW = "57P03"
    INTERNAL_ERROR = "XX000"
