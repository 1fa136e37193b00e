"""The OpenAI-compatible HTTP server over a loaded model (`jaxmoe serve`).

Owns the HTTP side of serving: the request and response shapes of the OpenAI API
(`protocol`), the FastAPI app and its routes, the API key and the bounded admission queue
(`app`), turning a request into a `generate.stream_generate` call and its tokens back into
responses and server-sent events (`completions`), the thread that runs each request's
generation beside the event loop (`bridge`), tool calls in the model's markup
(`tool_calls`), the Prometheus metrics (`metrics`), OpenAI's error JSON (`errors`) and
running it under uvicorn with a graceful shutdown (`serve`).

May import: config, quant, step_shapes, model, loading, cpu, planning, serving, tokenizer,
generate. Imported by: cli. Generation itself is `generate`'s: the server adds no sampling,
stopping or detokenizing rules of its own.
"""
