"""The MULTI-TAP reward served on Ray Serve (``multitap-rl serve``) and its JSON protocol.

* :mod:`.protocol` -- the wire format (JSON only), request limits, per-sample errors;
* :mod:`.service` -- one replica's request handling, without Ray (:class:`ScoringService`);
* :mod:`.app` -- the Ray Serve deployment (replicas, autoscaling, ``@serve.batch``).

The client is :mod:`reward_fns.remote`: every reward adapter takes a server URL where a
checkpoint goes, and applies weights, normalisation, gates and ``on_invalid`` on its side.
"""
