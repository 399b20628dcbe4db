"""The one low layer: every mechanic that estimators share, each in one module.

Layers, from the bottom (imports only run down, checked by
``tests/test_layers.py``):

1. ``attribkit.config`` - ComputeConfig, a leaf (imports only torch);
2. ``attribkit._compute`` - this package; imports only torch, numpy, scipy,
   scikit-learn, tqdm, ``attribkit.config`` and itself, never anything above:

   * ``validation`` - parameter checks and their sklearn-style messages;
   * ``budget`` - bytes available, rows within a budget, refusing before
     allocating;
   * ``precision`` - the factor dtype and the matmul dtype of each stage;
   * ``progress`` - the one progress bar;
   * ``data`` - every kind of ``data`` as ``(inputs, targets)`` batches;
   * ``vectors`` - user containers (numpy, torch, dict) <-> flat tensors;
   * ``distributed`` - the Reducer over ``torch.distributed``;
   * ``guard`` - one ``nn.Module`` used by one thread at a time;
   * ``model`` - parameter selection, eval mode, the one model-call dispatcher;
   * ``targets`` - losses and the one generator of Fisher target batches
     (empirical, true, expected);
   * ``capture`` - layer hooks: registries keyed by module type (Kronecker
     factors; per-example gradient rules);
   * ``gradients`` - per-example gradients from layer hooks (the rules in
     ``capture``), ``torch.func`` for what no rule covers;
   * ``curvature`` - Hessian-vector products of the mean loss;
   * ``ggn`` - Gauss-Newton-vector products (and ``G^T G / n`` in array mode);
   * ``checksum`` - a checksum of parameter values;

3. ``attribkit.base`` - BaseEstimator, the fit/transform template;
4. the estimators: ``attribkit.projection`` (random, kronecker, arnoldi) and
   ``attribkit.ifvp`` (explicit, datainf, ekfac, iterative), which never import each
   other (a mechanic two families need moves down here);
5. orchestration above the estimators: ``attribkit.gradients``
   (``per_example_gradients``), ``attribkit._scores`` (``influence``,
   ``self_influence``) and ``attribkit.persistence`` (``save``, ``load``);
6. ``attribkit.functional`` (dattri 0.1.0's functions over the estimators)
   and the package's ``__init__``. ``attribkit.evaluation`` stands alone
   (numpy and scipy only).

Nothing is re-exported here: import the module that holds a mechanic.
"""
