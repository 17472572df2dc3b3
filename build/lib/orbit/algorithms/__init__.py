"""RL core math: advantage estimators and policy losses, as pure functions on tensors.

Nothing here touches a model, an optimizer or a device: inputs are log-prob, reward and mask
tensors, outputs are tensors plus a metrics dict. That keeps every formula testable by hand.
"""
