FROM scratch
ADD --keep-git-dir=true {{GIT}}/repo.git#main /r
