FROM busybox
ARG V=1.0
LABEL version=$V "quoted key"="v $V"
