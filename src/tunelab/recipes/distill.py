"""Knowledge distillation recipe (``recipe: distill``): a student learns a teacher's next-token distributions.

Data are SFT examples (``data.train``, ``data.eval``); at every trained (answer) position the student's
distribution is pulled toward the teacher's with ``recipe.loss`` (forward KL, reverse KL or generalized
JSD with ``recipe.beta``) at ``recipe.temperature``, optionally mixed with the student's cross-entropy on
the reference answers (``recipe.alpha``); see ``training.distill`` (chunked: the logits of both models are
never held whole). The teacher is any model spec or run directory with the student's vocabulary (a larger
model of the family, or a full fine-tune of the task). Reported: the task score of the student before
and after, the teacher's next to them, and the forgetting probe. For sequence-level distillation (train
on the teacher's generated answers instead) see ``tunelab data generate``.
"""

from __future__ import annotations

from rich.console import Console

from tunelab.config.schema import RunConfig
from tunelab.data.packing import collator
from tunelab.errors import TunelabError
from tunelab.evaluation.report import evaluate_task
from tunelab.evaluation.run import LoadedModel, load_for_eval
from tunelab.evaluation.summary import eval_summary
from tunelab.recipes import TrainResult
from tunelab.recipes.options import DistillOptions
from tunelab.stages.evaluation import evaluate_after, evaluate_before, save_before
from tunelab.stages.model import check_method_fits, load_base
from tunelab.stages.run import finish_run, hashed_inputs
from tunelab.stages.setup import load_prepared_tokenizer, read_examples, tokenize
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, nothing_to_do, prepare_training,
                                     save_trained, training_loop)
from tunelab.training.distill import distill_objective
from tunelab.training.token_loop import run_token_loss


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Distil ``recipe.teacher`` into the configured student."""
    console = console or Console(stderr=True)
    options: DistillOptions = config.recipe
    if not options.teacher:
        raise TunelabError("recipe.teacher is not set: give the teacher model (an embedded alias, an HF folder or a run directory)")
    # 1. Validate the records, the run directory, the settings and the method before anything loads.
    examples = read_examples(config)
    env = check_environment(config, resume=resume, force=force, data_files=hashed_inputs(config) + _teacher_files(options.teacher),
                            task=examples)
    model_path, tokenizer, added = load_prepared_tokenizer(config)
    check_method_fits(config, added)

    # 2. The teacher (same vocabulary, frozen), the student before training, the method and optimizer.
    data = tokenize(config, tokenizer, examples, added)
    teacher = _load_teacher(options.teacher, tokenizer, env.accelerator.device)
    base = load_base(config, model_path, tokenizer, added, env.accelerator.device)
    before = evaluate_before(config, LoadedModel(base, tokenizer, "untuned"), examples, env.run_dir, console)
    if "teacher" not in before and examples.eval:
        before["teacher"] = evaluate_task(teacher, examples.eval[: config.eval.limit], config.eval, f"teacher {options.teacher}")
    tuned, state = prepare_training(config, env, base, tokenizer, added, data.train, console)
    if already_finished(env, state):
        return nothing_to_do(env, tuned.method.artifact, state.start_step, console)
    what = f"{len(data.train)} train / {len(data.eval)} eval examples, teacher {options.teacher}, {options.loss} at T={options.temperature:g}"
    manifest = begin_training_run(config, env, tuned, state, model_path, console, what)
    save_before(env.run_dir, before)

    # 3. Train on the teacher's distributions (padded batches: both models see the same rows).
    divergence = distill_objective(teacher.model, kind=options.loss, beta=options.beta, temperature=options.temperature,
                                   alpha=options.alpha)
    make_batch = collator(env.accelerator.unwrap_model(state.model), packing=config.train.packing)
    with training_loop(env, state, manifest):
        reporter = run_token_loss(state, data.train, data.eval, pad_id=tokenizer.pad_token_id, make_batch=make_batch,
                                  console=console, eval_batch_size=config.train.batch_size, token_loss=divergence)
    trained = save_trained(config, env, state, tuned, tokenizer, manifest, reporter, console)

    # 4. The student before and after, next to the teacher.
    report = evaluate_after(config, LoadedModel(trained.model, tokenizer, "tuned"), examples, before, env.run_dir, console,
                            extra={"teacher": before.get("teacher")})
    if report.get("teacher") and report.get("tuned"):
        console.print(f"Student {report['tuned']['score']:.1%} tuned against teacher {report['teacher']['score']:.1%} "
                      f"({config.eval.metric})")
    summary = {**eval_summary(report), "teacher_score": (report.get("teacher") or {}).get("score")}
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=reporter.last_loss,
               final_eval=reporter.last_eval, eval_summary=summary)
    return trained.result(env)


def _teacher_files(teacher: str) -> list[str]:
    """A teacher run's artifact is hashed with the data: a changed teacher refuses a resume."""
    from tunelab.runs import open_run

    run = open_run(teacher)
    return [str(run.artifact_dir)] if run is not None else []


def _load_teacher(spec: str, tokenizer, device) -> LoadedModel:
    teacher = load_for_eval(spec)
    if teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TunelabError(f"recipe.teacher={spec}: its vocabulary differs from the student's (model.path), so their next-token "
                           "distributions cannot be compared; pick a teacher of the same model family and tokenizer")
    teacher.model.to(device).eval().requires_grad_(False)
    teacher.model.config.use_cache = True
    return teacher
