"""The offline world where RL measurably learns (``multitap-rl demo``).

* :mod:`.shapes_world` -- what the world is: its values, captions, held-out scenes and the
  string-matching judge of a caption's truth (evaluation only);
* :mod:`.judge` -- the MULTI-TAP judge: a tiny Qwen2-VL trained with stage 1, stage-2 heads;
* :mod:`.captioner` -- a tiny Qwen2-VL captioner: format warm start, TRL GRPO against
  ``reward_fns.multitap_reward``, greedy held-out captions; :func:`run_captioner_world`;
* :mod:`.report` -- the plots and the final table;
* :mod:`.t2i` -- the text-to-image colour world of ``examples/alignprop_t2i.py --tiny`` and
  ``examples/ddpo_t2i.py --tiny``: a tiny Stable Diffusion, a judge, and a pixel oracle.
"""

from __future__ import annotations

from .captioner import CaptionerWorldConfig, run_captioner_world

__all__ = ["CaptionerWorldConfig", "run_captioner_world"]
