"""The evaluation report as Markdown: the protocol first, then the quality and steps tables, bits per code,
codebook facts and the sample grid. A pure function of the report dictionary the evaluate stage writes as
JSON, so both files always say the same thing.
"""
from __future__ import annotations


def _fmt_int(n) -> str:
  return f"{int(n):,}"


def protocol_lines(report: dict) -> list[str]:
  """What the numbers mean: N samples, the reference set and its size, the feature network, KID/PR's set."""
  p = report["protocol"]
  names, ref = p["metric_names"], p["reference"]
  accuracy = report.get("classifier_heldout_accuracy")
  lines = [f"**Protocol.** Feature network: {p['feature_network']}"
           + (f" (held-out accuracy {accuracy:.2%})" if accuracy is not None else "") + ".",
           "",
           f"- {names['fd']}: each image set against the statistics of the whole training split "
           f"`{ref['split']}` of {ref['dataset']} ({_fmt_int(ref['count'])} images, {ref['image_size']}×"
           f"{ref['image_size']}; file `{ref['file']}`).",
           f"- Samples: N = {_fmt_int(p['num_samples'])}, generated in chunks, with all T = {p['num_steps']} "
           "reverse steps unless the steps table says otherwise" + _temperature_clause(p) + ".",
           f"- {names['kid']}, {names['precision']} and {names['recall']}: up to the first "
           f"{_fmt_int(p['kid_pr_max_images'])} images of each set, against "
           f"{_fmt_int(p['kid_pr_real']['count'])} held-out images (`{p['kid_pr_real']['split']}`); "
           "inpainting completions against their originals. Precision and recall ± their binomial standard "
           "error (over the fake rows for precision, the real rows for recall)."]
  if p.get("inception_score_splits"):
    lines.append(f"- IS: Inception Score over {p['inception_score_splits']} splits (mean ± std).")
  if report.get("note"):
    lines += ["", report["note"]]
  return lines


def _temperature_clause(protocol: dict) -> str:
  """', at sampling temperature τ = 0.9 (...)' when samples and completions were not drawn from the model
  itself (τ = 1, or a report written before the temperature existed: nothing)."""
  tau = protocol.get("temperature", 1.0)
  if tau == 1.0:
    return ""
  return (f", at sampling temperature τ = {tau:g} (x̂_0's logits divided by τ in every reverse step, "
          "inpainting too; the −ELBO is the untempered model's)")


def _with_se(row: dict, name: str) -> str:
  """'0.801 ± 0.025' (a report written before standard errors were added: the value alone)."""
  se = row.get(f"{name}_se")
  return f"{row[name]:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _quality_table(report: dict) -> list[str]:
  names = report["protocol"]["metric_names"]
  with_is = "is" in names and any("is" in r for r in report["quality"].values())
  head = ["images", names["fd"], names["kid"], names["precision"], names["recall"]] + (
      ["IS"] if with_is else []) + ["n"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in report["quality"].items():
    cells = [name, f"{r['fd']:.3f}", f"{r['kid']:.4f} ± {r['kid_std']:.4f}",
             _with_se(r, "precision"), _with_se(r, "recall")]
    if with_is:
      cells.append(f"{r['is']:.2f} ± {r['is_std']:.2f}" if "is" in r else "–")
    lines.append("| " + " | ".join(cells + [_fmt_int(r["n"])]) + " |")
  return lines


def _steps_table(report: dict) -> list[str]:
  names = report["protocol"]["metric_names"]
  lines = ["| steps | fraction of T | sampling time (s) | " + names["fd"] + " | " + names["kid"] + " |",
           "|---|---|---|---|---|"]
  lines += [f"| {r['steps']} | {r['fraction']} | {r['seconds']:.1f} | {r['fd']:.3f} | {r['kid']:.4f} |"
            for r in report["steps_vs_quality"]]
  return lines


def _draws_table(report: dict) -> list[str]:
  """The samples row over several evaluation draws (`eval.sample_draws`), with their mean ± std."""
  d = report.get("sample_draws")
  if not d:
    return []
  names = report["protocol"]["metric_names"]
  metrics = ("fd", "kid", "precision", "recall")
  n = len(d["draws"])
  lines = ["", f"## Samples over {n} evaluation draws", "",
           f"The samples row ({d['steps']} steps) for {n} independent sets of "
           f"N = {_fmt_int(report['protocol']['num_samples'])} samples (same model, only the draw differs; "
           "draw `eval.seed` is the row above), with the mean ± standard deviation over the draws.", "",
           "| eval.seed | " + " | ".join(names[m] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
  digits = {"fd": 3, "kid": 4, "precision": 3, "recall": 3}
  lines += ["| " + " | ".join([str(r["seed"])] + [f"{r[m]:.{digits[m]}f}" for m in metrics]) + " |"
            for r in d["draws"]]
  lines.append("| mean ± std | " + " | ".join(
      f"{d['mean'][m]:.{digits[m]}f} ± {d['std'][m]:.{digits[m]}f}" for m in metrics) + " |")
  return lines


def _mean_std(summary: dict, metric: str, digits: int) -> str:
  std = summary["std"][metric]
  return f"{summary['mean'][metric]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _si(value: float) -> str:
  for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {unit}"
  return f"{value:.0f}"


def _comparison_lines(report: dict) -> list[str]:
  """The two priors side by side, then inpainting per mask, prior and protocol (evaluation/comparison.py)."""
  c = report.get("comparison")
  if not c:
    return []
  names = report["protocol"]["metric_names"]
  metrics = (("fd", 3), ("kid", 4), ("precision", 3), ("recall", 3))
  draws = c["priors"][0]["draws"]
  lines = ["", "## The two priors on the same code maps", "",
           f"Sample metrics: mean ± standard deviation over {draws} draw(s) of N = "
           f"{_fmt_int(report['protocol']['num_samples'])} samples each (seeds `eval.seed` + r, the same for both "
           "priors). Bits per code on the held-out code maps: the diffusion prior's −ELBO bounds −log2 p / (h·w) "
           "from above (± its Monte-Carlo error over t); the AR prior's cross-entropy is exact (± its standard "
           "error over the maps). Sampling time: compiled (a later draw's where there are several). FLOPs per sample: XLA's count of one network call "
           "on one map times the calls a sample takes.", "",
           "| prior | parameters | FLOPs / sample | held-out bits / code | " +
           " | ".join(names[m] for m, _ in metrics) + " | sampling ms / sample | network calls / sample |",
           "|---" * (6 + len(metrics)) + "|"]
  for r in c["priors"]:
    bits = "–" if r["bits_per_code"] is None else (
        f"{r['bits_per_code']:.4f}" + ("" if r["bits_se"] is None else f" ± {r['bits_se']:.4f}") +
        f" ({r['bits_kind']})")
    lines.append(f"| {r['prior']} | {_si(r['parameters'])} | {_si(r['flops_per_sample'])} | {bits} | " +
                 " | ".join(_mean_std(r, m, d) for m, d in metrics) +
                 f" | {r['sampling_ms_per_sample']:.2f} | {r['network_calls_per_sample']} |")
  lines += ["", "Inpainting: the same held-out images and masks for every prior and protocol; "
            f"{names['kid']}, {names['precision']} and {names['recall']} against the originals; ESS: the "
            "effective sample size of the reweighted candidates (mean over images); s / draw: completing, decoding "
            "and scoring one draw (compiled).", "",
            "| mask | prior | protocol | " + " | ".join(names[m] for m, _ in metrics) +
            " | ESS | s / draw |", "|---" * (5 + len(metrics)) + "|"]
  for r in c["inpainting"]:
    ess = "–" if r["ess_mean"] is None else f"{r['ess_mean']:.2f}"
    lines.append(f"| {r['mask']} | {r['prior']} | {r['protocol']} | " +
                 " | ".join(_mean_std(r, m, d) for m, d in metrics) + f" | {ess} | {r['seconds_per_draw']:.1f} |")
  lines += ["", f"![AR samples]({c['ar_samples_grid']})"]
  return lines


def _fmt_ms(row: dict, metric: str, digits: int, scale: float = 1.0) -> str:
  if row[metric] is None:
    return "–"
  std = row.get(f"{metric}_std")
  return f"{row[metric] * scale:.{digits}f}" + ("" if not std else f" ± {std * scale:.{digits}f}")


MAX_CLASS_ROWS = 20  # Classes listed in report.md's per-class table.


def _conditional_lines(report: dict) -> list[str]:
  """A class-conditional prior under classifier-free guidance (evaluation/conditional.py)."""
  c = report.get("conditional")
  if not c:
    return []
  names = report["protocol"]["metric_names"]
  cols = (("accuracy", 1, 100.0), ("fd", 3, 1.0), ("precision", 3, 1.0), ("recall", 3, 1.0))
  header = ["classifier accuracy (%)", names["fd"], names["precision"], names["recall"]]
  lines = ["", "## Class-conditional samples under guidance", "",
           f"N = {_fmt_int(c['num_samples'])} samples per guidance scale s, sample i asking for class i mod C, "
           f"{c['steps']} steps; mean ± standard deviation over {c['draws']} draw(s) (seeds `eval.seed` + r, the "
           "same for every s). s = 1: the conditional model; s = 0: the null label's. Accuracy: the evaluation "
           "classifier's prediction equals the requested class" + ("" if c["classifier"] else
                                                                  " (no classifier for this data: –)") +
           f". {names['fd']} against the training split, precision / recall against the held-out images.", "",
           "| s | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
  for r in c["rows"]:
    o = r["overall"]
    lines.append(f"| {r['guidance_scale']:g} | " + " | ".join(_fmt_ms(o, m, d, k) for m, d, k in cols) + " |")
  lines += ["", "Per class (mean over draws; each class's samples against its own training / held-out images; "
            "FD from few samples per class is biased upwards: compare across s):", "",
            "| class | " + " | ".join(f"s = {r['guidance_scale']:g}: acc % / {names['fd']} / P / R"
                                     for r in c["rows"]) + " |", "|---" * (len(c["rows"]) + 1) + "|"]
  num_classes = len(c["rows"][0]["per_class"])
  for y in range(min(num_classes, MAX_CLASS_ROWS)):
    cells = []
    for r in c["rows"]:
      p = r["per_class"][y]
      acc = "–" if p["accuracy"] is None else f"{100 * p['accuracy']:.0f}"
      cells.append(f"{acc} / {p['fd']:.2f} / {p['precision']:.2f} / {p['recall']:.2f}")
    lines.append(f"| {y} | " + " | ".join(cells) + " |")
  if num_classes > MAX_CLASS_ROWS:
    lines += ["", f"(The first {MAX_CLASS_ROWS} of {num_classes} classes; report.json holds every class.)"]
  lines += [""] + [f"![s = {r['guidance_scale']:g}](classes_s{r['guidance_scale']:g}.png)" for r in c["rows"]]
  return lines


def markdown(report: dict) -> str:
  """The whole report as Markdown."""
  lines = ["# VQ-DDM evaluation report", ""] + protocol_lines(report) + [""] + _quality_table(report)
  lines += ["", "## Sampling steps against quality and wall time", ""] + _steps_table(report)
  lines += _draws_table(report)
  lines += _comparison_lines(report)
  lines += _conditional_lines(report)
  ev = report.get("heldout_nelbo") or {}
  if ev:
    lines += ["", f"Held-out −ELBO: **{ev['nelbo_bits_per_code']:.3f} ± {ev['stderr']:.3f} bits per code** "
              f"(uniform prior: {ev['uniform_bits_per_code']:.3f}; Monte Carlo over "
              f"{ev['t_samples_per_map']} t per map, {ev['num_maps']} maps, step {ev['step']})."]
    if "null_label_nelbo_bits_per_code" in ev:
      lines += ["", f"Given the null label (the same network as an unconditional prior): "
                f"**{ev['null_label_nelbo_bits_per_code']:.3f} ± {ev['null_label_stderr']:.3f} bits per code**; "
                "the difference is what knowing the class is worth."]
  ar = report.get("heldout_ar_bits") or {}
  if ar:
    lines += ["", f"Held-out bits per code of the AR prior: **{ar['bits_per_code']:.3f} ± {ar['stderr']:.3f}**, "
              f"exact (± the standard error over {ar['num_maps']} maps, step {ar['step']}); the −ELBO above bounds "
              "the same quantity from above."]
  cb = report.get("codebook") or {}
  if cb:
    lines += ["", f"Codebook: {cb['usage']:.1%} of codes used on held-out images ({cb['usage_10']:.1%} at "
              f"least 10 times), perplexity {cb['perplexity']:.1f}, reconstruction MSE {cb['mse']:.5f}."]
  lines += ["", f"![samples]({report['samples_grid']})", ""]
  return "\n".join(lines)
