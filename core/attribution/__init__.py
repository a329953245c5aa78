"""Token-level Integrated Gradients in parts: quadrature rules as data (`quadrature`), the batched IG driver
(`integrated_gradients`), results and word tables (`results`) and deletion curves (`deletion`).
`core.token_attribution` is the API on top of them, with the settings and the caching."""

from ..errors import LensError


class AttributionError(LensError):
    """An input that cannot be attributed; the message is meant for the user."""
