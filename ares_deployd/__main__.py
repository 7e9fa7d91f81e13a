from ares_deployd.daemon import main

raise SystemExit(main())
