"""``dynmm serve``: a Ray Serve application over a registered model: the pyfunc's request format, per-path
batching, a strict compute budget.

``source`` finds the model's files (a registry version or a pipeline's checkpoint, read as config + state
dict, never unpickled); ``protocol`` speaks what ``mlflow models serve`` speaks (``/invocations`` with
``dataframe_split``, ``dataframe_records`` or ``inputs``; ``/ping``, ``/health``); ``app`` is the Serve
deployment that gathers requests with ``@serve.batch`` and answers them through ``dynmm.track.answers``
(the same code as the pyfunc); ``runner`` starts it on the platform's local Ray (loopback only) or a
cluster's and shuts it down on Ctrl-C. Must not import dynmm.train or dynmm.tune.
"""
