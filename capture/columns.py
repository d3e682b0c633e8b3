"""How many characters the history tables' text columns hold: ``storage/schema.py`` declares
its columns with these, and the record modules cut values to them."""

ID = 64  # record ids, hashes and fingerprints
NAME = 255  # models, users, error types, upstream ids, titles
USER_AGENT = 512
PATH = 1024
ROLE = 32
FINISH_REASON = 64
METHOD = 16
IP = 64
CALL_TYPE = 16  # chat, responses, embeddings, completions
