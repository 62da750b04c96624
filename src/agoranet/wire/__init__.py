"""Every message that crosses between nodes, typed, in both directions (layer 1, beside `core`).

`openai` is the OpenAI API (requests, answers, stream chunks) with Agora's `agora` extension, `sse`
the server-sent-event framing and its one decoder, `canonical` the request a receipt binds, and
`storage` the storage peers' messages. Whoever sends or reads one of these uses the model here.
"""
