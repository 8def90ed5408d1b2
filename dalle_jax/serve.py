"""An OpenAI-compatible images endpoint and a web page over a trained workdir.

    pip install -e ".[serve]"
    python -m dalle_jax.serve --workdir workdirs/mini --port 8000
    # then open http://127.0.0.1:8000/ or, from Python:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").images.generate(
    #       prompt="a red circle above a blue square", n=2, size="256x256")

`--workdir` is a pipeline workdir (its dalle/ and, for `rerank`, its CLIPs: clip/ and
grey_clip/ if trained) or a transformer workdir (with `--clip_workdir` for reranking). The API is in `dalle_jax/serving/api.py`.
"""
import contextlib
import signal
import sys

from absl import flags, logging

from dalle_jax import cli

flags.DEFINE_string("workdir", None, "A pipeline workdir, or a trained transformer's workdir.")
flags.DEFINE_string("clip_workdir", None, "A trained CLIP's workdir, for `rerank` (default: "
                    "the pipeline's clip/ and grey_clip/).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "The transformer's inference "
                  "dtype: parameters cast to it on load, compute and key/value cache in it "
                  "(default: as trained).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("batch_size", 8, "Images drawn per compiled call, across requests.")
flags.DEFINE_integer("max_queue", 64, "Requests that may wait; more are answered 429.")
flags.DEFINE_integer("max_n", 10, "Most images per request.")
flags.DEFINE_integer("max_candidates", 64, "Most candidates per request with `rerank`.")
flags.DEFINE_float("guidance", 1.0, "Guidance scale of requests that give none.")
flags.DEFINE_integer("max_body_bytes", 64 * 1024, "Largest request body accepted (413 beyond).")
flags.DEFINE_integer("stored_images", 1024, "Images kept for `url` answers (oldest expire).")
flags.DEFINE_bool("warmup", True, "Compile the sampler before taking requests.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def stop_cleanly_on_signals(server_class):
    """uvicorn's Server, but a SIGTERM or SIGINT ends `run()` after the graceful shutdown
    instead of being raised again (which kills the process before the batcher is closed and
    makes a requested stop look like a crash)."""

    class Server(server_class):
        @contextlib.contextmanager
        def capture_signals(self):
            stops = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def main(argv):
    del argv
    try:
        import uvicorn

        from dalle_jax.serving.api import make_app
    except ImportError as e:
        sys.exit(f"dalle_jax.serve: {e.name} is missing: pip install -e \".[serve]\"")
    from dalle_jax.serving.images import ImageRequest, ImageService, Limits

    try:
        service = ImageService.from_workdir(
            FLAGS.workdir, clip_workdir=FLAGS.clip_workdir, batch_size=FLAGS.batch_size,
            dtype=FLAGS.dtype,
            default_guidance=FLAGS.guidance, max_waiting=FLAGS.max_queue,
            limits=Limits(max_n=FLAGS.max_n, max_candidates=FLAGS.max_candidates))
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    if FLAGS.warmup:
        logging.info("compiling the sampler")
        size = service.image_size
        service.generate(ImageRequest(prompt="warm up", size=f"{size}x{size}", seed=0))
    application = make_app(service, max_body_bytes=FLAGS.max_body_bytes,
                           stored_images=FLAGS.stored_images)
    print(f"serving on http://{FLAGS.host}:{FLAGS.port}/", flush=True)
    server = stop_cleanly_on_signals(uvicorn.Server)(uvicorn.Config(
        application, host=FLAGS.host, port=FLAGS.port, log_level="warning"))
    try:
        server.run()
    finally:
        service.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    cli.run(main)
