"""Access control: API keys (only a keyed hash of each is stored). The keys are made, listed,
revoked and rotated here and with ``manage.py apikey``; ``/v1/`` does not ask for them yet."""
