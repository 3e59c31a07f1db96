"""The output contract: where every file of a run lives (:mod:`.layout`) and how any
filesystem is opened (:mod:`.fs`). Ray-free: ``run``, ``report``, ``compare`` and
``remove`` all use it."""
