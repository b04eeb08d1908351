"""Expert pruners: each builds an ``ExpertPlan`` (``models/plan.py``) that ``models.surgery.apply_plan``
applies.

``expert_pruner=<name>`` picks one (``conf/expert_pruner/<name>.yaml``; its schema in ``configs.py``
names the class in ``_target_``). Every pruner has ``plan(ctx) -> ExpertPlan``, counts the forward
passes it runs, and says what it needs (``ConfiguredPruner.needs``); those that need one calibration
pass also split planning into ``observer(adapter, layers)`` and ``plan_from_stats(stats, adapter, ctx)``
so that the streaming runtime can feed them one decoder layer at a time.
"""
