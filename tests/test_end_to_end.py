"""The whole pipeline, tokenizer to samples (configs/pipeline_tiny.py): its hand-overs, skipping and resuming."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import tiny_pipeline_config
from dalle_jax import pipeline
from dalle_jax import workdir as workdir_lib
from dalle_jax.models import dalle as dalle_model
from dalle_jax.sampling.generator import Generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stages_share_one_tokenizer_and_the_pipelines_dvae(mini_config, pipeline_run):
    configs = pipeline.stage_configs(tiny_pipeline_config(mini_config), pipeline_run)
    tokenizer = os.path.join(pipeline_run, "tokenizer.model")
    assert os.path.isfile(tokenizer)
    for stage in ("dvae", "clip", "grey_clip", "dalle"):
        saved = workdir_lib.read_config(os.path.join(pipeline_run, stage))
        assert saved.text.tokenizer == tokenizer == configs[stage].text.tokenizer
        assert (saved.text.length, saved.text.vocab_size) == (20, 64)
    assert configs["dalle"].task.dvae_workdir == os.path.join(pipeline_run, "dvae")
    with pytest.raises(ValueError, match="'dalle' without 'dvae'"):
        config = tiny_pipeline_config(mini_config)
        config.stages = ("clip", "dalle")
        pipeline.stage_configs(config, pipeline_run)
    with pytest.raises(ValueError, match="each must be one of"):
        config.stages = ("dvae", "gan")
        pipeline.stage_configs(config, pipeline_run)


def test_the_pipelines_two_clips_rerank_together(pipeline_run):
    from dalle_jax.models.scorer import ClipCommittee

    clips = [os.path.join(pipeline_run, s) for s in ("clip", "grey_clip")]
    assert workdir_lib.rerankers(pipeline_run) == clips
    assert workdir_lib.transformer_and_rerankers(pipeline_run) == (
        os.path.join(pipeline_run, "dalle"), clips)
    generate = Generator.from_workdir(pipeline_run)
    assert isinstance(generate.scorer, ClipCommittee)
    colour, grey = generate.scorer.members
    assert colour.grey_without is None
    assert grey.grey_without == ("red", "green", "blue", "yellow", "magenta", "cyan")


def test_samples_are_reranked_grids_with_scores(pipeline_run):
    out = os.path.join(pipeline_run, "samples")
    with open(os.path.join(out, "samples.json")) as f:
        record = json.load(f)
    assert len(record["prompts"]) == 2 and record["n"] == 2
    assert len(record["candidates"]) == 2 * 4
    for p in range(2):
        grid = np.asarray(Image.open(os.path.join(out, f"grid_{p:03d}.png")))
        assert grid.shape == (32, 64, 3)
        kept = [c for c in record["candidates"] if c["prompt"] == p and c["kept_rank"] is not None]
        best = sorted((c for c in record["candidates"] if c["prompt"] == p),
                      key=lambda c: -c["score"])[:2]
        assert sorted(c["index"] for c in kept) == sorted(c["index"] for c in best)


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(
        mini_config, pipeline_run, tmp_path):
    """A copy of the finished run loses the transformer's last checkpoint (as if killed after
    step 30): `train.py` with the pipeline config skips the dVAE and CLIP, resumes the
    transformer from step 30 and ends with the parameters of the uninterrupted run."""
    workdir = str(tmp_path / "run")
    shutil.copytree(pipeline_run, workdir)
    shutil.rmtree(os.path.join(workdir, "dalle", "checkpoints", "60"))
    shutil.rmtree(os.path.join(workdir, "samples"))
    assert workdir_lib.latest_step(os.path.join(workdir, "dalle")) == 30

    data_dir = mini_config().data.data_dir
    overrides = [f"--config.{stage}.data.data_dir={data_dir}"
                 for stage in ("dvae", "clip", "grey_clip", "dalle")]
    result = run_train("--config", os.path.join(ROOT, "configs", "pipeline_tiny.py"),
                       "--workdir", workdir, *overrides,
                       "--config.clip.mesh.num_devices=1", "--config.grey_clip.mesh.num_devices=1",
                       "--config.dalle.mesh.shape=(1,2,1)", "--config.dalle.mesh.num_devices=2")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr  # the progress log, shown without any --verbosity
    assert "[dvae] already trained to step 80: skipped" in log
    assert "[clip] already trained to step 80: skipped" in log
    assert "[grey_clip] already trained to step 40: skipped" in log
    assert "[dalle] training 30 steps from step 30" in log
    assert "[samples] 2 captions in " in log
    assert "this run of the pipeline took " in log
    assert f"images: {os.path.join(workdir, 'samples')}/grid_*.png" in result.stdout

    def raw_params(run):
        return workdir_lib.Run(os.path.join(run, "dalle")).load_model(dalle_model.from_config,
                                                                      use_ema=False)

    resumed, original = raw_params(workdir), raw_params(pipeline_run)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed, nnx.Param)),
                    jax.tree.leaves(nnx.state(original, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # The same seed draws the same candidates from the same model.
    with open(os.path.join(workdir, "samples", "samples.json")) as f, \
            open(os.path.join(pipeline_run, "samples", "samples.json")) as g:
        again, first = json.load(f), json.load(g)
    np.testing.assert_allclose([c["score"] for c in again["candidates"]],
                               [c["score"] for c in first["candidates"]], atol=1e-3)


def test_judged_rates_on_true_and_shifted_captions(mini_config):
    from dalle_jax.evaluation import judge
    from dalle_jax.evaluation.captions import judged_rates
    from dalle_jax.data.examples import load_examples

    examples = load_examples(mini_config(), limit=40)
    rates = judged_rates(examples.images, examples.captions)
    assert rates["images"] == 40 and rates["match"] == 1.0 and rates["colour"] == 1.0
    shifted = examples.captions[1:] + examples.captions[:1]
    expected = np.mean([judge.matches(im, c) for im, c in zip(examples.images, shifted)])
    assert expected < 0.5
    assert judged_rates(examples.images / 255.0, shifted)["match"] == pytest.approx(expected)


def test_any_match_is_the_share_of_captions_with_a_matching_draw(mini_config):
    from dalle_jax.evaluation.captions import evaluate_captions
    from dalle_jax.data.examples import load_examples

    examples = load_examples(mini_config(), limit=4)
    truth = examples.images

    class OneTrueDrawForTwoCaptions:
        """Blank draws, except the true image as draw 1 of caption 0 and draw 0 of caption 2."""
        scorer = None

        def __call__(self, captions, n, seed, **controls):
            out = np.zeros((len(captions), n) + truth.shape[1:], np.uint8)
            out[0, 1], out[2, 0] = truth[0], truth[2]
            return out.reshape(-1, *truth.shape[1:])

    rates, _ = evaluate_captions(OneTrueDrawForTwoCaptions(), examples.captions, candidates=3,
                                 keep=1, guidance_scales=(2.0,))
    for setting in ("plain", "guidance 2"):
        assert rates[setting]["any_match"] == 0.5
        assert rates[setting]["match"] == pytest.approx(2 / 12)


def test_reranked_images_are_the_scorers_picks_with_or_without_progress(mini_config):
    from dalle_jax.evaluation.captions import evaluate_captions
    from dalle_jax.data.examples import load_examples

    examples = load_examples(mini_config(), limit=3)
    truth = examples.images

    class TrueDrawLast:
        """Two blank draws and then the true image; the scorer prefers brighter images."""
        class scorer:
            @staticmethod
            def score(images, captions):
                return np.asarray(images, np.float32).mean(axis=(1, 2, 3))

        def __call__(self, captions, n, seed, **controls):
            out = np.zeros((len(captions), n) + truth.shape[1:], np.uint8)
            out[:, -1] = truth[:len(captions)]
            return out.reshape(-1, *truth.shape[1:])

    seen = []
    for on_rates in (None, lambda name, rates: seen.append(name)):
        rates, images = evaluate_captions(TrueDrawLast(), examples.captions, candidates=3,
                                          keep=1, on_rates=on_rates)
        picked = "plain, best 1 of 3 by CLIP"
        np.testing.assert_array_equal(images[picked][:, 0], truth)
        assert rates[picked]["match"] == 1.0 and rates["plain"]["match"] == pytest.approx(1 / 3)
    assert seen == ["plain", "plain, best 1 of 3 by CLIP"]
    TrueDrawLast.scorer = None
    _, images = evaluate_captions(TrueDrawLast(), examples.captions, candidates=3, keep=1,
                                  on_rates=lambda name, rates: seen.append(name))
    assert list(images) == ["plain"] and seen[-1] == "plain"


def test_best_of_curve_against_picking_each_group_by_hand():
    from dalle_jax.evaluation.captions import best_of_curve

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 32))
    matches = rng.random((5, 32)) < 0.3

    def by_hand(n):
        picks = []
        for row_scores, row_matches in zip(scores, matches):
            for start in range(0, 32, n):
                group = list(row_scores[start:start + n])
                picks.append(row_matches[start + group.index(max(group))])
        return np.mean(picks)

    curve = best_of_curve(scores, matches)
    assert list(curve) == [32, 16, 8]
    for n, rate in curve.items():
        assert rate == pytest.approx(by_hand(n))
    assert list(best_of_curve(scores[:, :6], matches[:, :6])) == [6]
    assert list(best_of_curve(scores[:, :24], matches[:, :24], smallest=2)) == [24, 12, 6, 3]
    with pytest.raises(ValueError, match="must both be"):
        best_of_curve(scores, matches[:, :8])


def test_every_setting_draws_with_the_given_sampling_controls(mini_config):
    from dalle_jax.evaluation.captions import evaluate_captions
    from dalle_jax.data.examples import load_examples

    examples = load_examples(mini_config(), limit=2)
    calls = []

    class Recorder:
        scorer = None

        def __call__(self, captions, n, seed, **controls):
            calls.append(controls)
            return np.zeros((len(captions) * n,) + examples.images.shape[1:], np.uint8)

    evaluate_captions(Recorder(), examples.captions, candidates=2, keep=1,
                      guidance_scales=(1.5, 3.0), temperature=0.7, top_k=8)
    assert calls == [{"temperature": 0.7, "top_k": 8},
                     {"temperature": 0.7, "top_k": 8, "guidance": 1.5},
                     {"temperature": 0.7, "top_k": 8, "guidance": 3.0}]


def test_evaluate_reports_every_setting_and_stage(pipeline_run, capsys):
    from dalle_jax import evaluate

    report = evaluate.evaluate(pipeline_run, evaluate.Options(
        captions=3, candidates=2, keep=1, guidance=(2.0,), batch_size=8, reference_examples=40))
    for split in ("validation", "heldout"):
        result = report["splits"][split]
        assert result["captions"] == 3
        assert set(result["rates"]) == {"plain", "plain, best 1 of 2 by CLIP", "guidance 2",
                                       "guidance 2, best 1 of 2 by CLIP"}
        assert result["rates"]["plain"]["images"] == 6
        assert result["rates"]["guidance 2"]["images"] == 6
        assert result["rates"]["plain, best 1 of 2 by CLIP"]["images"] == 3
        for setting in ("plain", "guidance 2"):
            reranked = result["rates"][f"{setting}, best 1 of 2 by CLIP"]
            # The curve's full-size point is the very pick the reranked setting judged.
            assert reranked["best_of"][2] == pytest.approx(reranked["match"])
        for file in result["grids"].values():
            assert os.path.isfile(os.path.join(pipeline_run, "evaluation", file))
    assert report["dvae"]["examples"] == 40 and "objects_kept" in report["dvae"]
    assert 0.0 <= report["clip"]["text_to_image_recall_at_1"] <= 1.0
    # The missing-object check: 40 scenes of each split, judged by both CLIPs and together.
    for split in ("validation", "heldout"):
        judges = report["missing_objects"][split]
        assert set(judges) == {"committee", "clip 0", "clip 1"}
        assert all(40 <= rates["variants"] <= 120 and 0.0 <= rates["all"] <= 1.0
                   for rates in judges.values())
    with open(os.path.join(pipeline_run, "evaluation", "report.md")) as f:
        text = f.read()
    assert "## CLIP and missing objects" in text and "| `heldout` | committee |" in text
    assert "## `heldout`: 3 captions" in text and "PSNR" in text and "any draw matches" in text
    assert "| guidance 2 | " in text.split("Best of n by CLIP")[1]
    printed = capsys.readouterr().out
    assert "report and grids in" in printed
    # Progress as each setting is judged, before the report.
    assert printed.index("[heldout] guidance 2, best 1 of 2 by CLIP: match ") < printed.index("# Evaluation")
    assert "2 images per caption, temperature 0.7, top_k 0" in text
    assert "position" in text and "relation (true caption over the reversed one)" in text
    # One split only: its captions, none of the other's.
    heldout = evaluate.evaluate(pipeline_run, evaluate.Options(
        captions=2, candidates=2, guidance=(), batch_size=8, reference_examples=8,
        splits=("heldout",)))
    assert list(heldout["splits"]) == ["heldout"] and heldout["splits"]["heldout"]["captions"] == 2
    with pytest.raises(ValueError, match="keep=3"):
        evaluate.evaluate(pipeline_run, evaluate.Options(candidates=2, keep=3))
    with pytest.raises(ValueError, match="temperature=-1"):
        evaluate.evaluate(pipeline_run, evaluate.Options(temperature=-1))


@pytest.mark.parametrize("flags, message", [
    (["--candidates=2", "--keep=3"],
     "dalle_jax.evaluate: keep=3 must be between 1 and candidates=2"),
    (["--guidance=2,x"], "dalle_jax.evaluate: --guidance=2,x must be comma-separated numbers"),
    (["--splits=heldout,train"],
     "dalle_jax.evaluate: splits=heldout,train must be some of validation,heldout"),
])
def test_evaluate_command_names_a_bad_flag_in_one_line(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "dalle_jax.evaluate",
                             f"--workdir={tmp_path}", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
