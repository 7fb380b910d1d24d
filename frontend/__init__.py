"""tandem.frontend: the public face: OpenAI HTTP and gRPC APIs, request validation, tokenization,
the per-request pipeline, the control service workers register with, and metrics."""
