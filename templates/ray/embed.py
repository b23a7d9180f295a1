"""The embedding job as a Ray program: fleet's bundled `text-embed` handler, one actor per GPU.

    fleet ray submit --working-dir templates/ray -- python embed.py --inputs 'corpus/**/*.txt' --outputs embeddings

Reads text files from the shared directory (FLEET_SHARED on every node), embeds them in
batches with the same handler the bundled worker uses (all-MiniLM-L6-v2, no download) and
writes one .npy per input, atomically (tmp + rename), skipping inputs already done. One
actor per GPU (`num_gpus=1`); on a CPU-only fleet one actor per worker (`--cpu-actors`).
Actors have restarts and their calls retries: a preempted node's batch runs again
elsewhere, and what was written stays. Compare with `fleet run templates/jobs/embed.yaml`,
which does the same with leases on the shared directory instead of a scheduler.
"""

import argparse
import glob
import json
import os
import time
from pathlib import Path

import ray


@ray.remote(max_restarts=-1, max_task_retries=-1)
class Embedder:
    def __init__(self, batch_size: int) -> None:
        from fleet.worker.handlers import HandlerContext, load_handler, resolve_device

        self.handler = load_handler("text-embed", {})
        self.device = resolve_device("auto", True)
        shared = Path(os.environ.get("FLEET_SHARED", "."))
        self.handler.open(HandlerContext(device=self.device, shared_root=shared,
                                         node=os.environ.get("FLEET_NODE_NAME", "?")))
        self.batch_size = batch_size

    def embed(self, inputs: list[str], outputs: list[str]) -> tuple[int, str]:
        shared = Path(os.environ["FLEET_SHARED"])
        # The worker's order of calls: load per item, prepare (tokenise), infer a batch, serialize.
        items = self.handler.prepare([self.handler.load((shared / p).read_bytes()) for p in inputs])
        results = []
        for i in range(0, len(items), self.batch_size):
            results.extend(self.handler.infer(items[i:i + self.batch_size]))
        for out, result in zip(outputs, results):
            target = shared / out
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self.handler.serialize(result))
            os.replace(tmp, target)
        return len(outputs), os.environ.get("FLEET_NODE_NAME", "?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", default="corpus/**/*.txt", help="glob under the shared directory")
    parser.add_argument("--outputs", default="embeddings-ray")
    parser.add_argument("--chunk", type=int, default=64, help="files per call")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpu-actors", type=int, default=None, help="actors without GPUs (default: 1 per worker)")
    args = parser.parse_args()
    ray.init()
    # On the head's shared directory (the driver runs on the head): the workers see it mounted.
    shared = Path(os.environ["FLEET_SHARED"])
    inputs = sorted(str(Path(p).relative_to(shared)) for p in glob.glob(str(shared / args.inputs), recursive=True))
    todo = [(p, f"{args.outputs}/{Path(p).with_suffix('.npy')}") for p in inputs]
    todo = [(p, o) for p, o in todo if not (shared / o).exists()]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        actors = [Embedder.options(num_gpus=1).remote(args.batch_size) for _ in range(gpus)]
    else:
        workers = len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0])
        count = args.cpu_actors or max(1, workers)
        actors = [Embedder.options(num_cpus=1).remote(args.batch_size) for _ in range(count)]
    start = time.time()
    chunks = [todo[i:i + args.chunk] for i in range(0, len(todo), args.chunk)]
    pending = [actors[i % len(actors)].embed.remote([p for p, _ in c], [o for _, o in c])
               for i, c in enumerate(chunks)]
    written = 0
    nodes: set[str] = set()
    while pending:
        done, pending = ray.wait(pending)
        count, node = ray.get(done[0])
        written += count
        nodes.add(node)
    wall = time.time() - start
    print(json.dumps({"program": "embed", "inputs": len(inputs), "written": written, "actors": len(actors),
                      "gpus": gpus, "nodes": sorted(nodes), "wall_s": round(wall, 3),
                      "items_per_s": round(written / wall, 1) if wall else None}))


if __name__ == "__main__":
    main()
