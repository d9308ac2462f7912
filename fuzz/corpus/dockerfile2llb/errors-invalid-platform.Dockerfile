FROM --platform=nope busybox
