FROM busybox
ENV A=1
ENV B='$A' C="$A x" D="a\"b"
