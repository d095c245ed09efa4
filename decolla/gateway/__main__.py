from decolla.gateway.server import main

raise SystemExit(main())
