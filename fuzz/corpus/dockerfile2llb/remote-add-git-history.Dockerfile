FROM busybox
ADD {{GIT}}/repo.git#main /r
