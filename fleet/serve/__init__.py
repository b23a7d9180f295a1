"""Calling the models that `fleet serve` runs on the nodes, from the laptop.

    import fleet

    with fleet.connect("fleet.yaml") as f:
        embed = f.serving("embed", preprocess=clean_text, postprocess=normalise)
        vector = embed.batched_run("one text")         # any thread, blocks
        vectors = embed.batched_run(["a", "b", "c"])   # several at once, same order
        for out in embed.map(texts, concurrency=64):   # a stream, results in order
            ...

`connection` holds the `Connection` (the fleet's state and SSH executor; the one entry
point other client features hang off), `client` the `Serving` handle and its pool of
servers, `errors` what a caller can catch.
"""

from fleet.serve.connection import Connection, connect
from fleet.serve.errors import ServingError, ServingTimeout

__all__ = ["Connection", "ServingError", "ServingTimeout", "connect"]
