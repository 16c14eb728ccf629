"""A run's training data: prepared into the run folder (or read from a prepared folder), then encoded.

A fresh run always prepares its own copy (the run folder is new: nothing stale can be in it); a resumed run reads
the copy it prepared and refuses one whose fingerprint differs from the one its manifest recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.errors import TunelabError
from tunelab.train.distributed import main_process_work


@dataclass
class Encoded:
    train: list[dict]
    val: list[dict]
    val_records: list[dict]  # the held-out records as messages (system prompt applied): for generation metrics
    fingerprint: str
    data_info: dict[str, Any]


def with_system_prompt(records: list[dict], system_prompt: str | None) -> list[dict]:
    """The records as training encodes them: the run's system prompt where a record has none (in `messages`, and
    in a preference record's `prompt`, which is what its encoding reads)."""
    if not system_prompt:
        return records
    system = {"role": "system", "content": system_prompt}

    def first(turns: list[dict]) -> list[dict]:
        return turns if turns and turns[0]["role"] == "system" else [system] + turns

    return [{**r, **{k: first(r[k]) for k in ("messages", "prompt") if isinstance(r.get(k), list)}} for r in records]


def load_data(cfg: Config, tokenizer, run_path: Path, main: bool, fresh: bool,
              expected_fingerprint: str | None = None, say=print) -> Encoded:
    """Prepare raw files into `<run>/data` (or read a prepared folder), then encode with the chat template."""
    from tunelab.data.prepare import is_prepared, load_prepared

    src = Path(cfg.data.train)
    folder = src if is_prepared(src) else run_path / "data"  # else raw data: a file, or a folder of files
    with main_process_work():  # a dataset the main process refuses stops every process with its reason
        if folder != src and main and (fresh or not (folder / "train.jsonl").is_file()):
            _prepare_into(cfg, tokenizer, src, folder, run_path.name)
    prepared = load_prepared(folder)
    _check_prepared(prepared.report, cfg, folder, fresh)
    _check_same_data(prepared, folder, expected_fingerprint, say)
    val_records, eval_info = prepared.val, {}
    if cfg.data.eval and folder == src:  # a prepared train folder plus a separate eval source
        ev_folder = Path(cfg.data.eval)
        if not is_prepared(ev_folder):
            raise TunelabError(f"data.eval={cfg.data.eval}: with a prepared folder as data.train, data.eval must be a "
                               "prepared folder too (prepared with the same tokenizer and max_length): tunelab "
                               f"prepare --input {cfg.data.eval} --output data/processed/{ev_folder.stem}")
        ev = load_prepared(ev_folder)
        _check_prepared(ev.report, cfg, ev_folder, fresh)
        if not fresh:
            _check_same_eval(ev.fingerprint, ev_folder, run_path, say)
        val_records = ev.val or ev.train
        eval_info = {"eval_folder": str(ev_folder), "eval_fingerprint": ev.fingerprint}
    if cfg.training.stage == "pt":
        encoded = _encode_text(cfg, tokenizer, prepared, val_records, folder)
        encoded.data_info.update(eval_info)
        return encoded
    train_recs = with_system_prompt(prepared.train, cfg.data.system_prompt)
    val_recs = with_system_prompt(val_records, cfg.data.system_prompt)
    train = _encode(cfg, tokenizer, train_recs, "train", run_path, main, say)
    val = _encode(cfg, tokenizer, val_recs, "val", run_path, main, say)
    if not train:
        raise TunelabError(f"no trainable records in {folder}: every record was rejected (see its report.md)")
    info = {"folder": str(folder), "source": cfg.data.train, "train_records": len(train), "val_records": len(val),
            "train_tokens": sum(e.get("n_tokens", len(e.get("input_ids", ()))) for e in train),
            "train_target_tokens": sum(e["n_targets"] for e in train), **eval_info}
    kept = {e["where"] for e in val}
    val_kept = [r for r in val_recs if f"{r.get('source')}:{r.get('location')}" in kept]
    return Encoded(train, val, val_kept, prepared.fingerprint, info)


def _check_prepared(report: dict, cfg: Config, folder: Path, fresh: bool) -> None:
    """A prepared folder this run may train on: usable, prepared for this stage, and (a fresh run; a resumed one
    compares fingerprints) not older than the raw files it was prepared from."""
    from tunelab.data.prepare import changed_sources

    _check_usable(report, folder)
    _check_stage(report, cfg, folder)
    changed = changed_sources(report) if fresh else []
    if changed:
        raise TunelabError(f"{folder} was prepared from files that have changed since: {'; '.join(changed)}. It "
                           "holds the records of the old files: prepare it again (tunelab prepare with the inputs "
                           f"and options in {folder / 'report.md'}), or give the raw data as data.train")


def _check_same_data(prepared, folder: Path, expected: str | None, say) -> None:
    """A resumed run trains on the records it started with (`expected`: the fingerprint its manifest recorded). A
    fresh run on a folder edited after prepare wrote it is told that its report no longer describes the records."""
    edits = "; ".join(prepared.edited)
    if expected and prepared.fingerprint != expected:
        what = (f"its files were edited after tunelab prepare wrote them: {edits}" if prepared.edited
                else "it was prepared again since, from other files or with other settings")
        raise TunelabError(f"--resume: the data in {folder} is not the data this run trained on: {what} (fingerprint "
                           f"{prepared.fingerprint[:19]}… now, {expected[:19]}… recorded). The checkpoint's weights, "
                           "optimiser and schedule were made on the old records: start a new run to train on these "
                           "(without --resume), or put the old data back to resume")
    if prepared.edited and not expected:
        say(f"warning: {folder} was edited after tunelab prepare wrote it: {edits}. Its report no longer describes "
            f"these records; the run records their own fingerprint ({prepared.fingerprint[:19]}…). Prepare the data "
            "again to have them checked and counted")


def _check_same_eval(fingerprint: str, folder: Path, run_path: Path, say) -> None:
    """A resumed run evaluates on the held-out records it started with: its eval losses, early stopping and
    checkpoint-best compare each evaluation with the earlier ones (the fingerprint recorded in the manifest's data)."""
    from tunelab.rundir import RunDir

    recorded = (RunDir(run_path).manifest().get("data") or {}).get("eval_fingerprint")
    if recorded is None:
        say(f"This run's manifest records no fingerprint of its eval data {folder} (an older tunelab started it): "
            "it is not checked on this resume, and is recorded from now on")
    elif recorded != fingerprint:
        raise TunelabError(f"--resume: the eval data in {folder} is not the data this run evaluated on (fingerprint "
                           f"{fingerprint[:19]}… now, {recorded[:19]}… recorded): its eval losses, early stopping "
                           "and checkpoint-best would compare losses on two different held-out sets. Put the old eval "
                           "data back to resume, or start a new run (without --resume) to evaluate on this one")


def _check_usable(report: dict, folder: Path) -> None:
    """A folder `tunelab prepare` wrote but found not usable (it said so and exited 1) is not trained on."""
    if report.get("usable") is False:
        why = "; ".join(report.get("problems") or ["(no reason recorded)"])
        raise TunelabError(f"{folder} is not usable, as tunelab prepare reported: {why}. See {folder / 'report.md'}; "
                           "fix the data and prepare it again (or raise --max-reject-ratio if those rejections are "
                           "expected)")


# Data settings prepare applies to the records it writes, so that a prepared folder already carries them:
# (config field, prepare option, its command-line flag, the config's default, which asks for nothing).
APPLIED_BY_PREPARE = (("format", "format", "--format", "auto"), ("map", "column_map", "--map", {}),
                      ("system_prompt", "system_prompt", "--system-prompt", None),
                      ("text_documents", "text_documents", "--text-documents", "auto"))


def _check_stage(report: dict, cfg: Config, folder: Path) -> None:
    """The folder was prepared for this run's stage, with the data settings the config asks for (APPLIED_BY_PREPARE):
    another would be written in the run's config.yaml and never applied."""
    options, stage = report.get("options") or {}, cfg.training.stage
    prepared_for = options.get("stage", "sft")
    if prepared_for != stage:
        raise TunelabError(f"{folder} was prepared for training.stage={prepared_for}, this run trains {stage}: "
                           f"prepare it again with `tunelab prepare --stage {stage}` or give the raw file as data.train")
    differ = _settings_not_applied(options, cfg)
    if differ:
        raise TunelabError(
            f"{folder} was prepared with {', '.join(f'{flag} {_shell(p)}' for _, flag, p, _ in differ)}, this run "
            f"asks for {', '.join(f'data.{key}={_shell(a)}' for key, _, _, a in differ)}: its records carry what "
            f"prepare applied, so the config's would not be. Prepare it again with `tunelab prepare --stage {stage} "
            f"{' '.join(f'{flag} {_shell(a)}' for _, flag, _, a in differ)}` or give the raw data as data.train")


def _settings_not_applied(options: dict, cfg: Config) -> list[tuple[str, str, Any, Any]]:
    """(config field, flag, prepared with, asked for) of each setting of APPLIED_BY_PREPARE that the config sets
    (not its default) to another value than the folder was prepared with."""
    out = []
    for key, option, flag, default in APPLIED_BY_PREPARE:
        prepared, asked = options.get(option), getattr(cfg.data, key)
        # a system prompt the folder lacks is added by training itself (with_system_prompt), as prepare adds it
        if option in options and asked not in (default, prepared) and not (key == "system_prompt" and not prepared):
            out.append((key, flag, prepared, asked))
    return out


def _shell(value: str | dict[str, str]) -> str:
    """A setting as `tunelab prepare` takes it on a command line (a column map as name=column,...)."""
    import shlex

    return shlex.quote(",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value))


def _encode_text(cfg: Config, tokenizer, prepared, val_records: list[dict], folder: Path) -> Encoded:
    """pt: train = blocks of documents (each document its own packed record), val = one piece per example."""
    from tunelab.data.text import block_examples, encode_text, piece_examples

    def pieces(records):
        ids, wheres = [], []
        for rec in records:
            p, _ = encode_text(tokenizer, rec["text"], cfg.data.max_length)
            ids += p
            wheres += [f"{rec.get('source')}:{rec.get('location')}"] * len(p)
        return ids, wheres

    train = block_examples(*pieces(prepared.train), cfg.data.max_length)
    val = piece_examples(*pieces(val_records))
    if not train:
        raise TunelabError(f"no trainable text in {folder}: every document was rejected (see its report.md)")
    info = {"folder": str(folder), "source": cfg.data.train, "train_records": len(train), "val_records": len(val),
            "train_documents": len(prepared.train), "val_documents": len(val_records),
            "train_tokens": sum(len(e["input_ids"]) for e in train),
            "train_target_tokens": sum(e["n_targets"] for e in train)}
    # no generation metrics on raw text (no prompt, no reference answer): val_records stays empty
    return Encoded(train, val, [], prepared.fingerprint, info)


def prepare_as_configured(cfg: Config, tokenizer, src: Path, folder: Path | None, name: str, **options):
    """`prepare_dataset` of `src` with the run's data settings: how training prepares its data, and how
    `tunelab reproduce` fingerprints it (`folder=None, check=True`)."""
    from tunelab.data.prepare import prepare_dataset

    return prepare_dataset([str(src)], folder, format=cfg.data.format, column_map=cfg.data.map or None,
                           tokenizer=tokenizer, max_length=cfg.data.max_length, overflow=cfg.data.overflow,
                           train_on=cfg.data.train_on, val_ratio=cfg.data.val_ratio,
                           eval_inputs=[cfg.data.eval] if cfg.data.eval else None, seed=cfg.training.seed,
                           system_prompt=cfg.data.system_prompt, name=name, stage=cfg.training.stage,
                           text_documents=cfg.data.text_documents, **options)


def _prepare_into(cfg: Config, tokenizer, src: Path, folder: Path, name: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    result = prepare_as_configured(cfg, tokenizer, src, folder, name)
    if not result.usable:  # the rejections were printed as they came; the run folder goes (nothing trained)
        raise TunelabError(f"no usable training data in {src}: {'; '.join(result.problems)}. The run folder is not "
                           "kept; `tunelab prepare` with the same data settings writes the whole report (report.md, "
                           "rejected.jsonl) to a folder of your choice")


def _encode_one(cfg: Config, tokenizer, rec: dict) -> dict:
    """One record as the recipe reads it: a conversation's input_ids and labels, or a preference record's ids."""
    from tunelab.data.template import encode_record

    if cfg.training.stage not in ("sft", "pt"):
        return _encode_preference(cfg, tokenizer, rec)
    enc = encode_record(tokenizer, rec["messages"], tools=rec.get("tools"), max_length=cfg.data.max_length,
                        train_on=cfg.data.train_on, overflow=cfg.data.overflow)
    return {"input_ids": enc.input_ids, "labels": enc.labels,
            "n_targets": sum(1 for x in enc.labels[1:] if x != -100)}


def _encode_preference(cfg: Config, tokenizer, rec: dict) -> dict:
    """A pair (or kto example) as the preference recipe reads it: token ids of the prompt and the answers."""
    from tunelab.data.preference import encode_preference

    enc = encode_preference(tokenizer, rec, cfg.data.max_length, cfg.data.overflow)
    answers = [len(v) for k, v in enc.items() if k.endswith("_ids") and k != "prompt_ids"]
    return {**{k: v for k, v in enc.items() if k.endswith("_ids") or k == "label"}, "n_targets": sum(answers),
            "n_tokens": len(enc["prompt_ids"]) * len(answers) + sum(answers)}


def _encode(cfg: Config, tokenizer, records: list[dict], split: str, run_path: Path, main: bool, say) -> list[dict]:
    """Each record encoded as training reads it; one that cannot be (nothing left to train, a chat template that
    refuses it) is set aside with its location and reason, listed in rejected_at_encode.<split>.jsonl."""
    from tunelab.data.prepare import encode_or_refuse, refused, to_json
    from tunelab.data.template import RecordRejected

    out, rejected = [], []
    for rec in records:
        try:
            enc = encode_or_refuse(_encode_one, cfg, tokenizer, rec)
        except RecordRejected as e:
            rejected.append(refused(rec, e))
            continue
        out.append({**enc, "where": f"{rec.get('source')}:{rec.get('location')}"})
    if rejected:
        listing = run_path / f"rejected_at_encode.{split}.jsonl"
        if main:
            with open(listing, "w", encoding="utf-8") as f:
                f.writelines(to_json(r) + "\n" for r in rejected)
        say(f"warning: {len(rejected)} {split} records could not be trained with these settings "
            f"(e.g. {rejected[0]['location']}: {rejected[0]['reason']}); listed in {listing}")
    return out
