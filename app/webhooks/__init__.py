"""Outgoing webhooks, the network side: where a webhook may go (`guard`), how a message is
signed (`signing`, the Standard Webhooks format) and how it is sent (`sender`). No database:
the deliveries, their retries and their log are the job domain's (app/jobs/webhooks.py)."""
