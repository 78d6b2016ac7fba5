"""`batchbox api`: OpenAI's Files and Batches API over HTTP, and a status page.

A client of the folder contract and nothing more: an uploaded batch becomes a complete file
(and its ticket) renamed into the inbox, its state is read from its `.status` sidecar (then
from `status.json` in its outbox folder), its output and error files are that folder's
`results.jsonl` and `errors.jsonl`, and a cancel is a `.cancel` file. What the API keeps of
its own (keys, uploads, records of files and batches) lives in `state/api/`.
"""
