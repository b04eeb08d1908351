"""The embedded default: a toy Mixtral MoE the project trains itself, and its task suite.

Public entry points (import from the submodules; this package stays import-light):

- ``stun_exp.toy.build.ensure_toy(cfg) -> Path``: the cached checkpoint dir for a ``model=toy*`` config
  (the default config is copied from the pretrained toy shipped in the package; any other is
  trained on first use; the fine-tuned model when ``cfg.finetune_domain`` is set).
- ``stun_exp.toy.build.ensure_toy_pair(cfg) -> (finetuned_dir, pretrained_dir)``: for router-change.
- ``stun_exp.toy.tasks.task_dir(model_dir) -> Path``: lm-eval ``include_path`` with ``toy_arith``,
  ``toy_facts``, ``toy_compare`` and ``heldout.txt``.
- ``stun_exp.toy.corpus.generate_docs(n, seed, split, mix, stream)``: the synthetic corpus.
- ``python -m stun_exp.toy`` (``stun-exp-toy``): ``build``, ``build-family``, ``rebuild``, ``info``.

Modules: ``corpus`` (seeded text), ``tokenizer`` (BPE), ``config`` (schema), ``train`` (recipe),
``build`` (cache), ``shipped`` (the pretrained default in the package), ``tasks`` (lm-eval files +
quick check), ``cli`` (the commands above).
"""
