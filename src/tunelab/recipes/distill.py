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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from tunelab.config.load import recipe_options
from tunelab.config.schema import RunConfig
from tunelab.data.packing import collator
from tunelab.errors import TunelabError
from tunelab.evaluation.report import evaluate_task
from tunelab.evaluation.run import LoadedModel, load_for_eval
from tunelab.evaluation.summary import eval_summary
from tunelab.recipes import Recipe, TrainResult, register_recipe
from tunelab.stages.evaluation import evaluate_after, evaluate_before, save_before
from tunelab.stages.model import check_method_fits, load_base
from tunelab.stages.optimize import save_state
from tunelab.stages.run import finish_run, hashed_inputs
from tunelab.stages.setup import load_prepared_tokenizer, read_examples, tokenize
from tunelab.stages.training import (already_finished, begin_training_run, check_environment, nothing_to_do, prepare_training,
                                     result_of, train_and_save)
from tunelab.training.distill import distill_loss_sum
from tunelab.training.token_loop import run_token_loss


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="the teacher: a model spec or run directory with the student's vocabulary")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="divergence at the trained positions")
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD's mixture weight (0 = forward KL, 1 = reverse KL)")
    temperature: float = Field(1.0, gt=0, description="softens both distributions (logits / temperature)")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the student's cross-entropy on the reference answers")


def main(config: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> TrainResult:
    """Distil ``recipe.teacher`` into the configured student."""
    console = console or Console(stderr=True)
    options: DistillOptions = recipe_options(config)
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
    tuned, opt = prepare_training(config, env, base, tokenizer, added, data.train, console)
    if already_finished(env, opt):
        return nothing_to_do(env, tuned.method.artifact, opt.start_step, console)
    what = f"{len(data.train)} train / {len(data.eval)} eval examples, teacher {options.teacher}, {options.loss} at T={options.temperature:g}"
    manifest = begin_training_run(config, env, tuned, opt, model_path, console, what)
    save_before(env.run_dir, before)

    # 3. Train on the teacher's distributions (padded batches: both models see the same rows).
    t = config.train
    def token_loss(model, batch):
        return distill_loss_sum(model, teacher.model, batch, kind=options.loss, beta=options.beta,
                                temperature=options.temperature, alpha=options.alpha)
    trained = train_and_save(config, env, opt, tuned, tokenizer, manifest, lambda: run_token_loss(
        opt, data.train, data.eval, pad_id=tokenizer.pad_token_id, make_batch=collator(env.accelerator.unwrap_model(opt.model),
        packing=t.packing), run_dir=env.run_dir, console=console, eval_batch_size=t.batch_size, keep_last=t.keep_last,
        max_grad_norm=t.max_grad_norm, save_state=save_state, token_loss=token_loss), console)

    # 4. The student before and after, next to the teacher.
    report = evaluate_after(config, LoadedModel(trained.model, tokenizer, "tuned"), examples, before, env.run_dir, console,
                            extra={"teacher": before.get("teacher")})
    if report.get("teacher") and report.get("tuned"):
        console.print(f"Student {report['tuned']['score']:.1%} tuned against teacher {report['teacher']['score']:.1%} "
                      f"({config.eval.metric})")
    summary = {**eval_summary(report), "teacher_score": (report.get("teacher") or {}).get("score")}
    finish_run(env.run_dir, manifest, **trained.costs, final_train_loss=trained.reporter.last_loss,
               final_eval=trained.reporter.last_eval, eval_summary=summary)
    return result_of(env, trained)


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


register_recipe(Recipe("distill", DistillOptions, main, "knowledge distillation from a teacher's token distributions (KL, JSD)"))
