"""The speedrun's data as published: tiny parquet replicas of its three datasets (exact column names and
types), each trained alone and all three as the speedrun configs' `data.mix`; captions named, never
guessed; the mix's order follows its weights, its counts reach metrics.jsonl and the end-of-training
line, and a resumed mix run ends bitwise where the uninterrupted one does."""

import json
import shutil
from collections import Counter

import pytest
import torch
from helpers import REPLICA_SIZES, Tap, mix_overrides, replica_captions, tiny, weights, write_replicas

from daybreak.build import demo_tokenizer
from daybreak.cli import main
from daybreak.data import BucketLoader, open_data
from daybreak.data.sources import caption_sample
from daybreak.run import build_trainer
from daybreak.training.logger import read_metrics

STEPS = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    return write_replicas(tmp_path_factory.mktemp("replicas"))


def column_values(name: str, column: str) -> set[str]:
    return {replica_captions(name, i)[column] for i in range(REPLICA_SIZES[name])}


def test_mix_layout_and_order_follow_the_weights(replicas, tmp_path):
    source, mixer = open_data(tiny(tmp_path, *mix_overrides(replicas)))
    # weights 1.7 : 6 : 1 over 6, 12 and 4 rows. The entry its weight under-represents most is the last
    # (4 rows for 1/8.7 of the samples), so one mix epoch is 4 × 8.7 = 34.8 samples: round(34.8 × 1.7/8.7) = 7
    # of flux_generated (≥ its 6 rows), round(34.8 × 6/8.7) = 24 of FLUX-Reason-6M (each row twice), 4.
    assert source.counts == [7, 24, 4] and len(source) == 35
    assert [s.caption_columns for s in source.sources] == [["caption_caption"], ["caption_detail"], ["llava"]]
    one = BucketLoader(source, batch_size=5, buckets=[(16, 16)], caption_mixer=mixer, seed=3)
    batches = [b for _, b in zip(range(7), one)]  # 7 × 5 = exactly one mix epoch
    drawn = Counter(k.split("/")[0] for b in batches for k in b["keys"])
    assert drawn == {"flux_generated": 7, "FLUX-Reason-6M": 24, "midjourney-v6-llava": 4}
    assert {f"data/{k}": v for k, v in drawn.items()} == {k: v for k, v in one.stats().items() if k.startswith("data/")}
    # each entry trains on its own named column
    for b in batches:
        for key, caption in zip(b["keys"], b["captions"]):
            name = key.split("/")[0]
            assert caption in column_values(name, source.sources[source.names.index(name)].caption_columns[0])
    # the order is the seed's: same seed, same keys; another seed, another order of the same epoch
    again = BucketLoader(source, batch_size=5, buckets=[(16, 16)], caption_mixer=mixer, seed=3)
    other = BucketLoader(source, batch_size=5, buckets=[(16, 16)], caption_mixer=mixer, seed=4)
    keys = [k for b in batches for k in b["keys"]]
    assert [k for _, b in zip(range(7), again) for k in b["keys"]] == keys
    other_keys = [k for _, b in zip(range(7), other) for k in b["keys"]]
    assert other_keys != keys and sorted(other_keys) == sorted(keys)
    # the rank split: rank r of 2 takes slice r of each global batch of 1 rank
    halves = [BucketLoader(source, batch_size=2, buckets=[(16, 16)], caption_mixer=mixer, seed=3, rank=r, world_size=2)
              for r in range(2)]
    whole = BucketLoader(source, batch_size=4, buckets=[(16, 16)], caption_mixer=mixer, seed=3)
    for a, b, w in zip(*halves, whole):
        assert a["keys"] + b["keys"] == w["keys"] and a["captions"] + b["captions"] == w["captions"]
        if halves[0].stats()["data/flux_generated"] > 8:
            break
    assert halves[0].stats() == halves[1].stats()


def test_captions_named_never_guessed(replicas, tmp_path, capsys):
    reason = replicas["FLUX-Reason-6M"]
    base = ["train", "tiny", f"run.dir={tmp_path / 'r'}", "data.source=hf", f"data.path={reason}", "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "several string columns" in err and "data.captions" in err
    assert all(c in err for c in ("id", "caption_detail", "caption_detail_cn", "caption_original_cn"))
    assert main([*base, "data.captions={long: 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names long" in err and "caption_detail, caption_detail_cn" in err
    # a named column trains the demo tower's tokenizer alone: no id, no Chinese, no other caption kind
    cfg = tiny(tmp_path / "t", "data.source=hf", f"data.path={reason}", "data.captions={caption_detail: 1}")
    assert sorted(caption_sample(open_data(cfg)[0], 100)) == sorted(column_values("FLUX-Reason-6M", "caption_detail"))
    tokens = demo_tokenizer(cfg)[0].get_vocab()
    assert not any("方" in t for t in tokens) and "fr" not in tokens


@pytest.mark.parametrize("name, captions", [("flux_generated", "{}"), ("FLUX-Reason-6M", "{caption_original: 1}"),
                                            ("midjourney-v6-llava", "{llava: 0.5, prompt: 0.5}")])
def test_each_dataset_trains_on_its_named_captions(replicas, tmp_path, name, captions):
    cfg = tiny(tmp_path, "data.source=hf", f"data.path={replicas[name]}", f"data.captions={captions}",
               "train.steps=1")
    trainer = build_trainer(cfg, progress=False)
    seen: list[str] = []
    trainer.data = Tap(trainer.data, lambda i, b: seen.extend(b["captions"]))
    trainer.fit()
    allowed = {"flux_generated": ["caption_caption"], "FLUX-Reason-6M": ["caption_original"],
               "midjourney-v6-llava": ["llava", "prompt"]}[name]
    assert seen and set(seen) <= set().union(*(column_values(name, c) for c in allowed))


def test_mix_trains_counts_and_resumes_bitwise(replicas, tmp_path, capsys):
    mix = mix_overrides(replicas, "speedrun-1024")  # stage 2: long and short columns mixed per dataset
    run = tmp_path / "whole"
    assert main(["train", "tiny", f"run.dir={run}", *STEPS, "data.image_size=16", "train.global_batch=4",
                 "train.micro_batch=2", "train.log_every=1", "sample.prompts=[]", *mix, "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in read_metrics(run) if "loss" in r]
    drawn = [{k: v for k, v in r.items() if k.startswith("data/")} for r in rows]
    assert [sum(d.values()) for d in drawn] == [4, 8, 12, 16]  # cumulative, every sample of every step
    last = drawn[-1]
    line = next(x for x in out.splitlines() if x.startswith("samples drawn per data.mix entry"))
    assert all(f"{k.split('/', 1)[1]} {int(v)} (" in line for k, v in last.items())
    # killed after step 2, resumed from its checkpoint: the same weights, bit for bit, and the same counts
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    final = build_trainer(tiny(resumed, *STEPS, *mix), progress=False).fit()
    a, b = weights(final), weights(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in read_metrics(resumed)[-1].items() if k.startswith("data/")} == last
    assert json.loads((run / "final" / "meta.json").read_text())["step"] == 4


def test_convert_and_inspect_a_mix(replicas, tmp_path, capsys):
    mix = mix_overrides(replicas)
    assert main(["data", "convert", "speedrun-512", str(tmp_path / "mds"), *mix, "--format", "mds"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(e["name"], e["written"], e["read_back"]) for e in report["entries"]] == [
        (n, REPLICA_SIZES[n], REPLICA_SIZES[n]) for n in REPLICA_SIZES]
    # the converted copies keep every string column: the same config trains on them by path alone
    moved = [f"data.mix.{n}.{k}={v}" for n in REPLICA_SIZES for k, v in (("path", tmp_path / "mds" / n), ("source", "mds"))]
    cfg = tiny(tmp_path / "r", *mix, *moved)
    converted, _ = open_data(cfg)
    assert converted.counts == [7, 24, 4] and converted[0]["captions"].keys() == {"caption_caption"}
    assert main(["data", "inspect", "speedrun-512", *mix, "--out", str(tmp_path / "ins")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples_per_mix_epoch"] == 35
    entry = summary["entries"][1]
    assert (entry["name"], entry["count"], entry["samples_per_mix_epoch"]) == ("FLUX-Reason-6M", 12, 24)
    assert entry["captions"] == {"caption_detail": 1.0} and entry["caption_words"]["caption_detail_cn"]["count"] == 12
    assert (tmp_path / "ins" / "FLUX-Reason-6M" / "contact_sheet.png").is_file()
    assert json.loads((tmp_path / "ins" / "inspect.json").read_text()) == summary
