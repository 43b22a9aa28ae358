"""Small offline worlds in which an RL loop against a MULTI-TAP reward can be checked end to end
by an oracle that never enters the loop (:mod:`.t2i`: text-to-image, the prompt's colour)."""
