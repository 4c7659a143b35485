"""biodistill.engine: distil a frozen teacher into a student under DeepSpeed.

The packages, one subsystem each::

    cli.py       entry: parse the flags, load the recipe, run the start-up checks, train
    config.py    the recipe schema: typed sections, YAML loading, dotted overrides, validation
    trainer.py   the loop: build, step, log, evaluate, save, preempt, export
    distiller.py one distillation forward: frozen teacher, vocab map, student, terms (what DeepSpeed trains)
    losses.py    the loss terms, each declaring what it reads and what its kind needs; the registry
    data/        corpora -> tokens -> the cache or a stream -> masked batches
    models/      encoder outputs, the teacher, student builders, MiniALBERT, published shapes, --smoke
    runtime/     process group, checkpoints, resume, reporting, health, skips, fault points, start-up checks
    bench/       the engine's benchmarks and make gpu-check
    evaluate/    biodistill-evaluate: fine-tune on downstream tasks, scores against costs
    deploy/      biodistill-export: ONNX Runtime fp32 / int8 models of a fine-tuned model, checked against PyTorch
    assets/      the bundled demo corpus

The data flow of one job::

    recipe (config.py)
      -> data/: corpora.read -> tokenise (Encoder, Chunker) -> cache.prepare | stream -> batches (MLM masks)
      -> models/: teacher.load_teacher (frozen, fp16/bf16) and students.build_student (copied layers)
      -> distiller.py: Distiller(student, terms, teacher): teacher forward, student forward, terms (losses.py)
      -> trainer.py: deepspeed.initialize(Distiller), then per step engine(batch) -> backward -> step
      -> runtime/: checkpoint.save (atomic, resumable), report (metrics.jsonl, monitors), checkpoint.export

Imports point down this list: cli -> trainer -> distiller -> data/, models/, losses, runtime/ -> config; runtime/
imports neither data/ nor models/; kernels/ (biodistill.kernels) imports nothing of the engine's but the
MiniALBERT model its whole-step benchmark trains.
"""
