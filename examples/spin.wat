;; spin: a rogue module that never returns. The sandbox's epoch deadline must stop it.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever
      br $forever)))
