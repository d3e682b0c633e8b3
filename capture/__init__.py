"""What the gateway records, with no I/O: the record types and how each API's request and
answer become rows for the history database.

``gateway/`` fills records on the request path and ``storage/`` turns them into rows and
writes them; both depend on this package, which depends on neither. One module per
captured API (``chat``) turns that API's request and answer, streamed or not, into a
record; ``registry`` maps a method and path to it, and a record kind back to its type for
the spool (``codec``).
"""
