"""Continued pre-training recipe: adapt a model to a domain's raw text before instruction tuning.

``data.train`` (and optionally ``data.eval``) are ``.txt``/``.md`` files, folders of them, or JSONL/CSV/Parquet
files with a text column (``recipe.text_field``); with ``data.format: fim``, code files too, each document
rearranged for fill-in-the-middle at ``data.fim.rate`` (``tunelab.data.fim``). Documents are cut into ``data.max_length``-token blocks
with every token trained (``tunelab.data.text``) and packed into rows without padding. Without
``data.eval``, every k-th block is held out (``recipe.holdout``). Reported before and after training:
perplexity on the held-out text, and the forgetting probe, as for SFT. Run directory, resume and
artifacts are those of every recipe (``stages.training``).
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import FimConfig, RunConfig
from tunelab.errors import TunelabError
from tunelab.data.packing import collator
from tunelab.data.text import read_texts, split_holdout, text_blocks, text_files
from tunelab.evaluation.run import LoadedModel
from tunelab.evaluation.summary import eval_summary
from tunelab.recipes import TrainResult
from tunelab.recipes.options import PretrainOptions
from tunelab.stages.evaluation import evaluate_after, evaluate_before, save_before
from tunelab.stages.model import check_method_fits, load_base
from tunelab.stages.run import finish_run
from tunelab.stages.setup import Examples, load_prepared_tokenizer
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, nothing_to_do, prepare_training,
                                     save_trained, training_loop)
from tunelab.training.token_loop import run_token_loss
from tunelab.training.loss import validation_loss


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Continue pre-training on raw text as configured."""
    console = console or Console(stderr=True)
    options: PretrainOptions = config.recipe
    # 1. Validate: every text file and record, the run directory, the settings, the method.
    code = config.data.format == "fim"
    train_docs = read_texts(config.data.train_files(), text_field=options.text_field, code=code)
    eval_docs = read_texts(config.data.eval_files(), text_field=options.text_field, code=code) if config.data.eval_files() else []
    files = [str(p) for p in text_files(config.data.train_files() + config.data.eval_files(), code)]
    env = check_environment(config, resume=resume, force=force, data_files=files, task=Examples([]))
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    train_docs, eval_docs = _fim(config, tokenizer, added, train_docs, eval_docs, console)
    check_method_fits(config, added)

    # 2. Token blocks; the untuned model's perplexity and probe; the method, optimizer and checkpoint.
    train = text_blocks(train_docs, tokenizer, config.data.max_length)
    held = text_blocks(eval_docs, tokenizer, config.data.max_length) if eval_docs else []
    if not held:
        train, held = split_holdout(train, options.holdout)
    base = load_base(config, model_path, tokenizer, added, env.accelerator.device)
    before = evaluate_before(config, LoadedModel(base, tokenizer, "untuned"), Examples([]), env.run_dir, console)
    if "perplexity" not in before:  # (a resumed run reads it back from eval_before.json)
        before["perplexity"] = _perplexity(base, held, config, tokenizer, env)
    tuned, state = prepare_training(config, env, base, tokenizer, added, train, console)
    if already_finished(env, state):
        return nothing_to_do(env, tuned.method.artifact, state.start_step, console)
    unit = "FIM pieces" if config.data.format == "fim" else "documents"
    what = f"{len(train_docs)} {unit}, {len(train)} blocks of <= {config.data.max_length} tokens, {len(held)} held out"
    manifest = begin_training_run(config, env, tuned, state, model_path, console, what)
    save_before(env.run_dir, before)

    # 3. Train every token of every block, then save the artifact.
    pack = options.packing and "packing" not in tuned.method.incompatible
    make_batch = collator(env.accelerator.unwrap_model(state.model), packing=pack)
    with training_loop(env, state, manifest):
        reporter = run_token_loss(state, train, held, pad_id=tokenizer.pad_token_id, make_batch=make_batch, console=console,
                                  eval_batch_size=config.train.batch_size)
    trained = save_trained(config, env, state, tuned, tokenizer, manifest, reporter, console)

    # 4. Perplexity on the held-out text and the probe, before against after.
    after = _perplexity(trained.model, held, config, tokenizer, env)
    report = evaluate_after(config, LoadedModel(trained.model, tokenizer, "tuned"), Examples([]), before, env.run_dir, console,
                            extra={"perplexity": {"before": before["perplexity"], "after": after, "blocks": len(held)}})
    if after:
        console.print(f"Held-out perplexity ({len(held)} blocks): {before['perplexity']['eval_ppl']:.2f} untuned → "
                      f"{after['eval_ppl']:.2f} tuned")
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=reporter.last_loss,
               final_eval=reporter.last_eval, eval_summary={**eval_summary(report), "perplexity_after": after})
    return trained.result(env)


def _fim(config: RunConfig, tokenizer, added: list[str], train_docs: list, eval_docs: list, console: Console | None):
    """With ``data.format: fim``: the documents rearranged for fill-in-the-middle (FIM tokens added to
    ``added`` when the tokenizer lacks them); else as they are."""
    if config.data.format != "fim":
        return train_docs, eval_docs
    from tunelab.data.fim import fim_documents, fim_tokens, pieces

    fim = config.data.fim or FimConfig()
    tokens, new = fim_tokens(tokenizer)
    added += new
    seed, size = config.train.seed, config.data.max_length
    train_pieces, eval_pieces = pieces(train_docs, tokenizer, size), pieces(eval_docs, tokenizer, size)
    if console is not None:
        console.print(f"Fill-in-the-middle: {len(train_docs)} files in {len(train_pieces)} pieces of <= {size} tokens, {fim.rate:.0%} "
                      f"rearranged, {fim.spm_rate:.0%} of those in SPM order; tokens {tokens.prefix} {tokens.suffix} {tokens.middle}"
                      + (" (added, their embeddings trained)" if new else ""), soft_wrap=True)
    return (fim_documents(train_pieces, tokens, rate=fim.rate, spm_rate=fim.spm_rate, seed=seed),
            fim_documents(eval_pieces, tokens, rate=fim.rate, spm_rate=fim.spm_rate, seed=seed + 1))


def _perplexity(model, blocks, config: RunConfig, tokenizer, env) -> dict | None:
    """Loss per token and perplexity on ``blocks`` (None when nothing is held out)."""
    if not blocks:
        return None
    return validation_loss(model, blocks, batch_size=config.train.batch_size, pad_id=tokenizer.pad_token_id,
                           device=env.accelerator.device, autocast=env.accelerator.autocast)


def inspect(config: RunConfig, example: int, console: Console) -> None:
    """``tunelab data inspect``: documents, token blocks (every token trained) and one block as the model sees it."""
    from tunelab.data import TokenizeStats, inspect_report

    options: PretrainOptions = config.recipe
    docs = read_texts(config.data.train_files(), text_field=options.text_field, code=config.data.format == "fim")
    _, tokenizer, added = load_prepared_tokenizer(config)
    docs, _ = _fim(config, tokenizer, added, docs, [], console)
    blocks = text_blocks(docs, tokenizer, config.data.max_length)
    if not 0 <= example < len(blocks):
        raise TunelabError(f"--example {example}: {len(docs)} documents give {len(blocks)} blocks")
    lengths = [len(b.input_ids) for b in blocks]
    stats = TokenizeStats(examples=len(blocks), tokens=sum(lengths), trained_tokens=sum(lengths), max_len=max(lengths),
                          mean_len=sum(lengths) / len(lengths))
    shown = [(tokenizer.decode(blocks[example].input_ids), True)]
    inspect_report(stats, shown, console, title=f"{len(docs)} documents → blocks of <= {config.data.max_length} tokens "
                                                f"({blocks[example].source})")
