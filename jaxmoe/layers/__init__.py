"""Building blocks shared by the model families of jaxmoe/models/ (grouped-query attention,
softmax top-k routing), as pure JAX functions over flax.struct weights; every matmul goes
through `jaxmoe.quant.linear`. May import the base modules and `jaxmoe.model`; nothing in
`jaxmoe.model` imports this package."""
