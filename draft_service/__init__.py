"""The draft service: a small model that dials out to the gateway and the oracles and drafts."""
